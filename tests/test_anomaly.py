"""detect_anomaly(): the first non-finite value is reported where it was born, naming the op,
the module path, the source line and the input or gradient at fault; off, it changes nothing."""
import inspect
import re

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import dispatch
from tinygpt.model import GPTModel
from tinygpt.anomaly import AnomalyError
from tinygpt.graph_state import state

CFG = {"vocab_size": 40, "context_length": 12, "emb_dim": 16, "n_heads": 2, "n_layers": 3, "drop_rate": 0.0, "qkv_bias": False}


def _model_and_batch():
    tg.manual_seed(3)
    ids = np.random.default_rng(3).integers(0, CFG["vocab_size"], (2, 9))
    return GPTModel(CFG), ids[:, :-1], ids[:, 1:]


def _line_of(marker: str) -> int:
    """The line number of the line in this file that holds `marker` (a comment)."""
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()
    return next(i for i, line in enumerate(lines, 1) if marker in line and "_line_of" not in line)


@pytest.mark.parametrize("k", [0, 2])
def test_nan_planted_in_a_weight_of_block_k_attention_is_reported_at_its_first_use(k):
    model, x, y = _model_and_batch()
    model.trf_blocks[k].att.W_value.weight.data[3, 5] = np.nan
    with pytest.raises(RuntimeError) as caught:
        with tg.detect_anomaly():
            F.cross_entropy(model(x), y)  # marker: forward with a NaN weight
    message = str(caught.value)
    assert "the forward of Linear produced NaN" in message
    assert re.search(rf"module: +trf_blocks\.{k}\.att\.W_value\n", message)
    assert f"parameter trf_blocks.{k}.att.W_value.weight" in message and "already held NaN (1 of 256 values)" in message
    assert "tinygpt/nn.py:" in message  # the line in Linear.forward that called the op
    assert f"test_anomaly.py:{_line_of('marker: forward with a NaN weight')}" in message  # the user's line
    assert state.observers == []  # the detector left with the exception


@pytest.mark.parametrize("k", [0, 1])
def test_inf_planted_by_a_forward_hook_built_from_ops_is_reported_in_that_module_at_the_hook_line(k):
    model, x, y = _model_and_batch()
    spike = np.zeros(CFG["emb_dim"], dtype=np.float32)
    spike[4] = np.inf
    model.trf_blocks[k].att.register_forward_hook(lambda m, inputs, out: out + tg.tensor(spike))  # marker: hook
    with pytest.raises(RuntimeError) as caught:
        with tg.detect_anomaly():
            F.cross_entropy(model(x), y)
    message = str(caught.value)
    assert "the forward of Add produced inf" in message
    assert re.search(rf"module: +trf_blocks\.{k}\.att\n", message)
    assert f"test_anomaly.py:{_line_of('marker: hook')} in <lambda>" in message
    assert "b (shape (16,), a leaf" in message and "already held inf (1 of 16 values)" in message


def test_inf_returned_whole_by_a_forward_hook_is_reported_as_that_modules_output():
    model, x, y = _model_and_batch()

    def blow_up(module, inputs, out):
        return tg.tensor(np.full(out.shape, np.inf, dtype=np.float32))

    model.trf_blocks[1].att.register_forward_hook(blow_up)
    with pytest.raises(RuntimeError, match=r"the output of module trf_blocks\.1\.att \(MultiHeadAttention\) holds inf "
                                           r"\(256 of 256 values\), but none of its ops produced it: it was returned by a "
                                           r"forward hook \(.*blow_up\)"):
        with tg.detect_anomaly():
            model(x)


def test_a_backward_that_returns_a_non_finite_gradient_is_named_with_the_input():
    x = tg.tensor([0.0, 4.0], requires_grad=True)
    with pytest.raises(RuntimeError) as caught, np.errstate(divide="ignore"):
        with tg.detect_anomaly():
            y = x.sqrt()  # marker: sqrt of zero
            (y * 3.0).sum().backward()
    message = str(caught.value)
    assert "the backward of Sqrt returned inf (1 of 2 values) in the gradient for x" in message
    assert f"test_anomaly.py:{_line_of('marker: sqrt of zero')}" in message
    assert "the gradient arriving at its output was finite" in message


def test_a_tensor_hook_that_returns_nan_is_caught_where_the_gradient_arrives():
    model, x, y = _model_and_batch()
    with tg.detect_anomaly():
        hidden = model.trf_blocks[0](model.tok_emb(x))
        hidden.register_hook(lambda g: np.full(g.shape, np.nan, dtype=np.float32))  # an array: no op to catch
        loss = F.cross_entropy(model.out_head(hidden), y)
        # the block is called on its own, so it is the outermost module
        expected = r"the gradient arriving at the output of Add holds NaN(?s:.*)module: +\(outermost module\)\n"
        with pytest.raises(RuntimeError, match=expected):
            loss.backward()


def test_a_backward_report_names_where_an_input_made_inside_the_detector_was_made():
    x = tg.tensor([0.0, 4.0], requires_grad=True)
    with pytest.raises(AnomalyError) as caught, np.errstate(divide="ignore"):
        with tg.detect_anomaly():
            h = x * 1.0  # marker: h made inside
            (h.sqrt() * 3.0).sum().backward()
    message = str(caught.value)
    assert f"gradient for x (shape (2,), made by Mul at tests/test_anomaly.py:{_line_of('marker: h made inside')}" in message
    assert "before detect_anomaly was entered" not in message


def test_a_saved_weight_changed_in_place_between_forward_and_backward_is_named(device):
    model, x, y = _model_and_batch()
    weight = model.trf_blocks[1].att.W_key.weight
    with pytest.raises(AnomalyError) as caught:
        with tg.detect_anomaly():
            loss = F.cross_entropy(model(x), y)  # marker: forward that saves the weight
            weight.data += 1  # marker: the in-place change
            loss.backward()
    message = str(caught.value)
    assert ("weight (shape (16, 16), a leaf: parameter trf_blocks.1.att.W_key.weight), saved by the forward of "
            "Linear for its backward, was changed in place before that backward ran (.data assigned 1 time since, "
            f"last at tests/test_anomaly.py:{_line_of('marker: the in-place change')} in test_a_saved_weight") in message
    assert re.search(r"module: +trf_blocks\.1\.att\.W_key\n", message) and "tinygpt/nn.py:" in message
    assert f"test_anomaly.py:{_line_of('marker: forward that saves the weight')}" in message


def test_an_optimizer_step_between_forward_and_backward_is_named_by_the_changed_sum(device):
    """AdamW writes into the parameters' arrays (no .data assignment, no version): the checksum sees it."""
    from tinygpt.optim import AdamW

    model, x, y = _model_and_batch()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(AnomalyError, match=r"weight \(shape \(40, 16\), a leaf: parameter out_head\.weight\), saved by "
                                           r"the forward of Linear .* \(the sum of its values went from .* to .*: its "
                                           r"elements were written"):
        with tg.detect_anomaly():
            loss = F.cross_entropy(model(x), y)
            optimizer.step()
            loss.backward()


def test_a_weight_given_a_new_array_before_backward_is_not_an_anomaly():
    """The forward saved the old array, which nobody changed: backward is that of the forward that ran."""
    model, x, y = _model_and_batch()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    expected = model.trf_blocks[1].att.W_key.weight.grad.numpy().copy()
    model.zero_grad()
    with tg.detect_anomaly():
        loss = F.cross_entropy(model(x), y)
        model.trf_blocks[1].att.W_key.weight.data = model.trf_blocks[1].att.W_key.weight.data + 1
        loss.backward()
    np.testing.assert_array_equal(model.trf_blocks[1].att.W_key.weight.grad.numpy(), expected)


def test_detect_anomaly_entered_twice_is_refused():
    detector = tg.detect_anomaly()
    with detector:
        with pytest.raises(RuntimeError, match="detect_anomaly is already active"):
            with detector:
                pass
    assert state.observers == []


def test_nothing_changes_when_every_value_is_finite():
    model, x, y = _model_and_batch()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    plain = [p.grad.numpy().copy() for p in model.parameters()]
    model.zero_grad()
    with tg.detect_anomaly():
        watched = F.cross_entropy(model(x), y)
        watched.backward()
    assert watched.item() == loss.item()
    for a, p in zip(plain, model.parameters()):
        np.testing.assert_array_equal(a, p.grad.numpy())


def test_off_by_default_nobody_watches():
    assert state.observers == []
    model, x, _ = _model_and_batch()
    model(x)
    assert state.observers == []


def test_train_command_with_detect_anomaly_names_the_op_that_made_the_first_nan(tmp_path, monkeypatch, capsys):
    from tinygpt.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 50, encoding="utf-8")
    monkeypatch.setattr(dispatch, "_mode", "plain")  # the plain op is the one patched below
    correct = F.GELU.forward
    monkeypatch.setattr(F.GELU, "forward", staticmethod(lambda ctx, x: correct(ctx, x) * np.float32(np.nan)))
    status = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--emb-dim", "16", "--n-layers", "2",
                   "--n-heads", "2", "--context-length", "16", "--batch-size", "2", "--max-steps", "2", "--no-progress",
                   "--detect-anomaly"])
    err = capsys.readouterr().err
    assert status == 1
    assert "detect_anomaly: the forward of GELU produced NaN" in err
    assert re.search(r"module: +trf_blocks\.0\.ff\.layers\.1\n", err)
