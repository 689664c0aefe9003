"""Autograd state is per thread: no_grad() in one thread leaves another thread's training
alone, and a trace or anomaly detector watches only the thread that entered it."""
import threading

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.graph_state import state
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW

CFG = {"vocab_size": 20, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0, "qkv_bias": False}


def _run(*targets):
    """Run each target in its own thread; re-raise the first exception one of them raised."""
    errors = []

    def guarded(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_training_in_one_thread_while_another_runs_inference_under_no_grad():
    tg.manual_seed(0)
    trained, served = GPTModel(CFG), GPTModel(CFG)
    ids = np.random.default_rng(0).integers(0, CFG["vocab_size"], (4, CFG["context_length"] + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    optimizer = AdamW(trained.parameters(), lr=1e-2)
    steps, losses, missing, inference_outputs = 40, [], [], []
    training_done = threading.Event()
    both_running = threading.Barrier(2)

    def train():
        both_running.wait()
        for _ in range(steps):
            loss = F.cross_entropy(trained(x), y)
            loss.backward()
            missing.append(sum(p.grad is None for p in trained.parameters()))
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        training_done.set()

    def serve():
        both_running.wait()
        while not training_done.is_set():
            with tg.no_grad():
                inference_outputs.append(served(x).requires_grad)

    _run(train, serve)
    assert missing == [0] * steps  # every step had a gradient for every parameter
    assert losses[-1] < losses[0] - 0.5
    assert inference_outputs and not any(inference_outputs)
    assert tg.is_grad_enabled()


def test_a_trace_records_only_the_nodes_of_its_own_thread():
    tg.manual_seed(1)
    model = GPTModel(CFG)
    ids = np.random.default_rng(1).integers(0, CFG["vocab_size"], (2, CFG["context_length"] + 1))
    with tg.trace() as alone:
        F.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).backward()
    tracing, other_ran = threading.Event(), threading.Event()
    traces = []

    def traced():
        with tg.trace() as t:
            tracing.set()
            other_ran.wait(timeout=60)  # the other thread's ops run while this trace is active
            F.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).backward()
        traces.append(t)

    def other():
        tracing.wait(timeout=60)
        assert state.observers == []  # the trace is not this thread's
        a = tg.tensor(np.ones(3, dtype=np.float32), requires_grad=True)
        for _ in range(50):
            a.tanh().exp().sum().backward()
        other_ran.set()

    _run(traced, other)
    (t,) = traces
    assert [n.op for n in t.nodes] == [n.op for n in alone.nodes]
    assert not {"Tanh", "Exp"} & {n.op for n in t.nodes}


def test_detect_anomaly_in_one_thread_does_not_stop_another():
    inside, done = threading.Event(), threading.Event()

    def watched():
        with tg.detect_anomaly():
            inside.set()
            done.wait(timeout=60)

    def unwatched():
        inside.wait(timeout=60)
        try:
            with np.errstate(invalid="ignore"):
                value = tg.tensor([-1.0]).sqrt().item()  # NaN, but nobody watches this thread
        finally:
            done.set()
        assert np.isnan(value)

    _run(watched, unwatched)
    with pytest.raises(RuntimeError, match="the forward of Sqrt produced NaN"), np.errstate(invalid="ignore"):
        with tg.detect_anomaly():
            tg.tensor([-1.0]).sqrt()
