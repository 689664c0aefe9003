"""kernels/decode.py: a cached decoding step on arrays gives GPTModel's forward through its modules
(logits and the cache it fills, to float rounding; greedy tokens the same), on awkward shapes,
and runs only when nothing could tell the two apart (gradients, training, hooks, an anomaly
detector, plain kernels, other modules)."""
import numpy as np
import pytest
from conftest import host

import tinygpt as tg
from tinygpt import nn
from tinygpt.finetune.lora import replace_linear_with_lora
from tinygpt.generate import generate
from tinygpt.kernels import decode
from tinygpt.model import GPTModel

CFG = {"vocab_size": 50, "context_length": 16, "emb_dim": 24, "n_heads": 3, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}
SHAPES = {  # name: (config changes, batch)
    "qkv bias, batch 3": ({}, 3),
    "no qkv bias, tied head, batch 1": ({"qkv_bias": False, "tie_weights": True}, 1),
    "one head of 24": ({"n_heads": 1}, 2),
    "24 heads of 1": ({"n_heads": 24}, 1),
    "one layer, classifier head with bias": ({"n_layers": 1, "num_classes": 3}, 2),
}


def model_of(changes: dict, seed: int = 0) -> GPTModel:
    """Weights ~ N(0, 0.5) (layer norm scales around 1), so that every position's logits differ."""
    model = GPTModel({**CFG, **changes}).eval()
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        p.data = tg.tensor(rng.normal(0.0, 0.5, p.shape) + name.endswith(".scale"), dtype=p.dtype, device=p.device).data
    return model


def steps(model, ids, prompt: int, monkeypatch, on_arrays: bool, max_len=None):
    """The logits of each one-token step after a prompt of `prompt` tokens, and the cache."""
    monkeypatch.setattr(decode, "applies", decode.applies if on_arrays else lambda model, ids: False)
    cache = model.new_cache(ids.shape[0], max_len)
    with tg.no_grad():
        model(ids[:, :prompt], cache)
        return [host(model(ids[:, t:t + 1], cache)) for t in range(prompt, cache.layers[0].k.shape[2])], cache


def count_steps(monkeypatch) -> list:
    calls = []
    step = decode.gpt_step
    monkeypatch.setattr(decode, "gpt_step", lambda *args: calls.append(1) or step(*args))
    return calls


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_step_on_arrays_gives_the_module_paths_logits_and_cache(shape, dtype, monkeypatch):
    tg.set_default_dtype(dtype)
    changes, batch = SHAPES[shape]
    model = model_of(changes)
    ids = np.random.default_rng(1).integers(0, CFG["vocab_size"], (batch, CFG["context_length"]))
    calls = count_steps(monkeypatch)
    fast, fast_cache = steps(model, ids, 3, monkeypatch, on_arrays=True, max_len=11)  # the cache fills up
    assert len(calls) == 11 - 3  # every step after the prompt ran on arrays
    slow, slow_cache = steps(model, ids, 3, monkeypatch, on_arrays=False, max_len=11)
    assert len(calls) == 11 - 3
    assert all(f.shape == (batch, 1, model.out_head.weight.shape[0]) and f.dtype == dtype for f in fast)
    tol = 1e-12 if dtype == "float64" else 1e-5  # the attention kernel and the plain softmax round differently
    for f, s in zip(fast, slow):
        np.testing.assert_allclose(f, s, rtol=tol, atol=tol)
    first = fast_cache.layers[0], slow_cache.layers[0]  # made before any attention: the same numbers
    assert np.array_equal(first[0].k, first[1].k) and np.array_equal(first[0].v, first[1].v)
    for f, s in zip(fast_cache.layers, slow_cache.layers):
        assert f.length == s.length == 11
        np.testing.assert_allclose(f.k, s.k, rtol=tol, atol=tol)
        np.testing.assert_allclose(f.v, s.v, rtol=tol, atol=tol)
    with tg.no_grad(), pytest.raises(ValueError, match="holds 11 tokens"):  # full: the same error as the modules'
        model(ids[:, :1], fast_cache)


def test_a_step_on_arrays_matches_a_forward_over_the_whole_sequence(device):
    model = model_of({})
    ids = np.random.default_rng(2).integers(0, CFG["vocab_size"], (2, CFG["context_length"]))
    with tg.no_grad():
        full = host(model(tg.tensor(ids)))
        cache = model.new_cache(2)
        model(ids[:, :1], cache)
        for t in range(1, CFG["context_length"]):
            np.testing.assert_allclose(host(model(ids[:, t:t + 1], cache))[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_greedy_generation_is_the_same_token_for_token_on_arrays_and_through_the_modules(device, monkeypatch):
    model = model_of({"context_length": 64})
    ids = np.random.default_rng(3).integers(0, CFG["vocab_size"], (2, 5))
    calls = count_steps(monkeypatch)
    fast = host(generate(model, ids, 60, 64))
    assert len(calls) == (59 if device in ("cpu", "cuda") else 0)  # the strict device takes the modules
    monkeypatch.setattr(decode, "applies", lambda model, ids: False)
    slow = host(generate(model, ids, 60, 64))
    assert np.array_equal(fast, slow) and np.array_equal(fast, host(generate(model, ids, 60, 64, use_cache=False)))
    assert len(set(fast[:, 5:].ravel().tolist())) > 5  # the weights make greedy choices differ


# ------------------------------------------------------------------ when the modules must run

def _hooked(model):
    return model.trf_blocks[0].att.register_forward_hook(lambda module, inputs, output: None)


def _lora(model):
    replace_linear_with_lora(model, rank=2, alpha=4.0)
    for name, p in model.named_parameters():  # B starts at 0: give the adapters an effect
        if name.endswith("lora.B"):
            p.data = p.data + 0.3


WATCHED = {  # what makes a step go through the modules: (set up, the with-block it runs in)
    "gradients on": (None, None),
    "training mode": (lambda model: model.train(), None),
    "a forward hook on a module": (_hooked, None),
    "an anomaly detector": (None, tg.detect_anomaly),
    "plain kernels": (lambda model: tg.set_kernels("plain"), None),
    "a LoRA layer": (_lora, None),
}


@pytest.mark.parametrize("case", WATCHED)
def test_anything_that_could_tell_sends_the_step_through_the_modules(case, monkeypatch):
    setup, context = WATCHED[case]
    model = model_of({})
    ids = np.random.default_rng(4).integers(0, CFG["vocab_size"], (1, 6))
    before = tg.kernels_mode()
    try:
        if setup is not None:
            setup(model)
        calls = count_steps(monkeypatch)
        cache = model.new_cache(1)
        if case == "gradients on":
            model(ids[:, :5], cache)
            out = model(ids[:, 5:], cache)
            assert out.requires_grad  # a graph was built, as through the modules
        else:
            with tg.no_grad(), (context() if context else _nothing()):
                model(ids[:, :5], cache)
                model(ids[:, 5:], cache)
        assert calls == []
    finally:
        tg.set_kernels(before)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_hook_is_called_for_every_generated_token_and_once_removed_the_arrays_come_back(monkeypatch):
    model = model_of({})
    seen = []
    handle = model.trf_blocks[1].ff.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    calls = count_steps(monkeypatch)
    generate(model, np.zeros((1, 3), dtype=np.int64), 5, 16)
    assert seen == [(1, 3, CFG["emb_dim"])] + [(1, 1, CFG["emb_dim"])] * 4 and calls == []
    handle.remove()
    assert not nn.any_hooks()
    generate(model, np.zeros((1, 3), dtype=np.int64), 5, 16)
    assert len(calls) == 4


def test_a_lora_model_generates_through_its_adapters():
    model = model_of({})
    _lora(model)
    ids = np.random.default_rng(5).integers(0, CFG["vocab_size"], (2, 4))
    assert np.array_equal(host(generate(model, ids, 10, 16)), host(generate(model, ids, 10, 16, use_cache=False)))


@pytest.mark.parametrize("bad", [-1, CFG["vocab_size"]])
def test_an_id_out_of_range_is_refused_in_one_line_as_through_the_modules(bad):
    model = model_of({})
    cache = model.new_cache(1)
    with tg.no_grad():
        model(np.zeros((1, 3), dtype=np.int64), cache)
        with pytest.raises(IndexError, match=f"id {bad} is out of range"):
            model(np.array([[bad]]), cache)
    assert cache.length == 3
