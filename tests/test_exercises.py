"""The exercises' checker: the answer key and tinygpt's own backward pass every exercise;
planted mistakes fail, each with the hint that names it; inputs leave mistakes nowhere to hide."""
import textwrap

import numpy as np
import pytest

import tinygpt.functional as F
import tinygpt as tg
from tinygpt.exercises import EXERCISES, UnknownExercise, layer_norm_walkthrough, run_check, sheet_text, start
from tinygpt.exercises.block_case import STEPS, run_steps

NAMES = list(EXERCISES)


def solution_file(tmp_path, name, body="", label="answer"):
    """A learner file: the sheet's forward, and the answer key's backward with `body` (code
    that may change `g`, the gradient named in `grad`) applied to one gradient."""
    path = tmp_path / f"{name}_{label}.py"
    path.write_text(textwrap.dedent(f"""\
        import numpy as np
        from tinygpt.exercises import EXERCISES
        from tinygpt.exercises.answers import {name} as reference
        from tinygpt.exercises.sheets.{name} import forward

        def backward(dout, cache):
            grads = reference(dout, cache)
            names = EXERCISES["{name}"].grads
            if not isinstance(grads, (tuple, dict)):
                grads = (grads,)
            grads = dict(grads) if isinstance(grads, dict) else dict(zip(names, grads))
        """) + textwrap.indent(textwrap.dedent(body), "    ") + "    return grads\n")
    return path


def planted(tmp_path, name, grad, code):
    return solution_file(tmp_path, name, f"g = grads[{grad!r}]\n{code}\ngrads[{grad!r}] = g\n", label="planted")


@pytest.mark.parametrize("name", NAMES)
def test_answer_key_passes_every_exercise(tmp_path, name):
    result = run_check(name, solution_file(tmp_path, name))
    assert result.passed, result.report()
    assert [g.name for g in result.grads] == list(EXERCISES[name].grads)
    assert all(g.status == "exact" and g.diff_numeric < 1e-7 for g in result.grads)
    assert "PASS" in result.report()


# How tinygpt's own backward is called from each sheet's cache (the inputs it saves, or
# equivalents: log(softmax(x)) has the same softmax as x; shift does not change gradients).
ENGINE_INPUTS = {
    "linear": "dict(x=cache[0], W=cache[1], b=cache[2])",
    "embedding": "dict(W=cache[0], ids=cache[1])",
    "layer_norm": "dict(x=cache[0], scale=cache[1], shift=np.zeros_like(cache[1]))",
    "gelu": "dict(x=cache[0])",
    "softmax": "dict(x=np.log(cache[0]))",
    "attention": "dict(q=cache[0], k=cache[1], v=cache[2])",
    "cross_entropy": "dict(logits=cache[0], targets=cache[1])",
    "block": "dict(x=cache['x'], p=cache['p'])",
}


@pytest.mark.parametrize("name", NAMES)
def test_engine_backward_submitted_as_a_solution_passes(tmp_path, name):
    path = tmp_path / f"{name}_engine.py"
    path.write_text(textwrap.dedent(f"""\
        import numpy as np
        from tinygpt.exercises import EXERCISES
        from tinygpt.exercises.sheets.{name} import forward

        def backward(dout, cache):
            return EXERCISES["{name}"].engine({ENGINE_INPUTS[name]}, dout)
        """))
    result = run_check(name, path)
    assert result.passed, result.report()


# (exercise, gradient, code changing g, words the hint must say): at least five per exercise
PLANTED = [
    ("linear", "dW", "g = g.T", "transposed"),
    ("linear", "dx", "g = 2 * g", "constant factor 2"),
    ("linear", "db", "g = dout.sum(axis=0)", "missing the sum over a broadcast axis"),
    ("linear", "dW", "g = np.einsum('bto,bti->boi', dout, cache[0])", "missing the sum over a broadcast axis"),
    ("linear", "dW", "g = -g", "sign flipped"),
    ("linear", "db", "g = dout.mean(axis=(0, 1))", "mean instead of sum"),
    ("embedding", "dW", "g = g.T", "transposed"),
    ("embedding", "dW", "g = 2 * g", "constant factor 2"),
    ("embedding", "dW", "g = np.zeros_like(g)\ng[cache[1]] += dout", "missing the sum over repeated ids"),
    ("embedding", "dW", "g = -g", "sign flipped"),
    ("embedding", "dW", "g = g / 6", "mean instead of sum"),
    ("layer_norm", "dx", "g = g.T", "transposed"),
    ("layer_norm", "dscale", "g = 2 * g", "constant factor 2"),
    ("layer_norm", "dshift", "g = dout.sum(axis=0)", "missing the sum over a broadcast axis"),
    ("layer_norm", "dx", "g = -g", "sign flipped"),
    ("layer_norm", "dshift", "g = dout.mean(axis=(0, 1))", "mean instead of sum"),
    ("layer_norm", "dx", "x, scale, xhat, rstd = cache\ng = rstd * (dout * scale - (dout * scale).mean(axis=-1, keepdims=True))",
     "missing the path through rstd"),
    ("gelu", "dx", "g = g.T", "transposed"),
    ("gelu", "dx", "g = 2 * g", "constant factor 2"),
    ("gelu", "dx", "g = -g", "sign flipped"),
    ("gelu", "dx", "g = g / g.size", "mean instead of sum"),
    ("gelu", "dx", "g = g / dout", "missing the chain rule"),
    ("softmax", "dx", "g = g.T", "transposed"),
    ("softmax", "dx", "g = 2 * g", "constant factor 2"),
    ("softmax", "dx", "g = -g", "sign flipped"),
    ("softmax", "dx", "y, = cache\ng = y * (dout - (dout * y).mean(axis=-1, keepdims=True))", "mean instead of sum"),
    ("softmax", "dx", "y, = cache\ng = y * (dout - dout * y)", "missing the sum over the softmax axis"),
    ("attention", "dk", "g = g.swapaxes(-1, -2)", "transposed"),
    ("attention", "dv", "g = 2 * g", "constant factor 2"),
    ("attention", "dq", "g = -g", "sign flipped"),
    ("attention", "dv", "g = g / 5", "mean instead of sum"),
    ("attention", "dq", "g = g * np.sqrt(7)", "constant factor sqrt(D)"),
    ("cross_entropy", "dlogits", "g = g.T", "transposed"),
    ("cross_entropy", "dlogits", "g = 2 * g", "constant factor 2"),
    ("cross_entropy", "dlogits", "g = -g", "sign flipped"),
    ("cross_entropy", "dlogits", "g = g / 5", "mean instead of sum"),
    ("cross_entropy", "dlogits", "g = g / dout", "upstream gradient"),
    ("cross_entropy", "dlogits", "g = 6 * g", "constant factor 6"),
    ("block", "W_1", "g = g.T", "transposed"),
    ("block", "W_q", "g = g.T", "transposed"),
    ("block", "h", "g = 2 * g", "constant factor 2"),
    ("block", "b_1", "g = grads['h'].sum(axis=0)", "missing the sum over a broadcast axis"),
    ("block", "scores", "g = -g", "sign flipped"),
    ("block", "shift1", "g = g / 20", "mean instead of sum"),
    ("block", "x1", "g = g - dout", "missing a path: the gradient through the residual out = x1 + ff_out"),
    ("block", "x", "g = g - grads['x1']", "missing a path: the gradient through the residual x1 = x + att_out"),
    ("block", "ln1", "g = g - grads['k'].transpose(0, 2, 1, 3).reshape(5, 4, 6) @ cache['p']['W_k']",
     "missing a path: the gradient through k = ln1 @ W_k.T"),
]


@pytest.mark.parametrize("name,grad,code,words", PLANTED, ids=[f"{p[0]}-{p[1]}-{p[3]}" for p in PLANTED])
def test_planted_mistake_fails_with_the_hint_that_names_it(tmp_path, name, grad, code, words):
    result = run_check(name, planted(tmp_path, name, grad, code))
    assert not result.passed
    assert [g.name for g in result.wrong] == [grad], result.report()
    assert words in result.wrong[0].hint, result.wrong[0].hint
    assert words in result.report() and "FAIL" in result.report()


def test_every_exercise_has_five_planted_mistakes():
    assert all(sum(p[0] == name for p in PLANTED) >= 5 for name in NAMES)


def test_wrong_gradient_names_its_worst_element(tmp_path):
    result = run_check("linear", planted(tmp_path, "linear", "dx", "g = g.copy()\ng[1, 2, 3] += 0.5"))
    (wrong,) = result.wrong
    index, theirs, expected, numeric = wrong.worst
    assert index == (1, 2, 3) and theirs == pytest.approx(expected + 0.5) and numeric == pytest.approx(expected, abs=1e-7)
    assert "no simple pattern" in wrong.hint and "1 of 24 elements" in wrong.hint


def test_float32_gradients_are_close_and_pass(tmp_path):
    result = run_check("layer_norm", planted(tmp_path, "layer_norm", "dx", "g = g.astype(np.float32)"))
    assert result.passed
    dx = result.grads[0]
    assert dx.status == "close" and 1e-9 < dx.diff_engine < 1e-5
    assert "close  max |yours - expected|" in result.report()


def test_block_report_names_the_first_wrong_gradient_going_backward(tmp_path):
    body = "grads['x'] = 2 * grads['x']\ngrads['h'] = -grads['h']\n"
    result = run_check("block", solution_file(tmp_path, "block", body, label="two"))
    assert [g.name for g in result.wrong] == ["h", "x"]
    assert "the first wrong gradient going backward is h" in result.report()


def test_nan_in_a_gradient_is_reported_as_not_finite(tmp_path):
    result = run_check("attention", planted(tmp_path, "attention", "dq", "g = g.copy()\ng[0, 1, 2, 3] = np.nan"))
    assert "not finite: 1 of 210 elements" in result.wrong[0].hint


@pytest.mark.parametrize("name", NAMES)
def test_sheet_forward_is_the_engine_forward_and_its_backward_is_a_stub(tmp_path, name):
    exercise = EXERCISES[name]
    inputs, dout = exercise.draw(np.random.default_rng(0))
    out, cache = exercise.sheet.forward(*inputs.values())
    if name != "block":  # the block's engine graph is checked intermediate by intermediate below
        args = [tg.tensor(a, dtype=np.float64) if a.dtype.kind == "f" else a for a in map(np.asarray, inputs.values())]
        engine_op = {"linear": F.linear, "embedding": lambda W, ids: F.embedding(ids, W), "layer_norm": F.layer_norm,
                     "gelu": F.gelu, "softmax": F.softmax, "cross_entropy": F.cross_entropy,
                     "attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True)}[name]
        np.testing.assert_allclose(out, engine_op(*args).numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError):
        exercise.sheet.backward(dout, cache)
    text = sheet_text(name)
    assert start(name, tmp_path).read_text() == text
    assert "raise NotImplementedError" in text and "np.add.at" not in text and "swapaxes(-1, -2) @ dout" not in text


def test_block_steps_compute_the_sheet_forward_intermediate_by_intermediate():
    exercise = EXERCISES["block"]
    inputs, _ = exercise.draw(np.random.default_rng(0))
    _, cache = exercise.sheet.forward(inputs["x"], inputs["p"])
    env = run_steps({"x": inputs["x"], **inputs["p"]})
    for name, _ in STEPS[:-1]:
        np.testing.assert_array_equal(env[name], cache[name], err_msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_leave_mistakes_nowhere_to_hide(name):
    exercise = EXERCISES[name]
    sizes = list(exercise.dims.values())
    assert len(set(sizes)) == len(sizes), exercise.dims
    inputs, dout = exercise.draw(np.random.default_rng(0))
    arrays = [a for v in inputs.values() for a in (v.values() if isinstance(v, dict) else [v]) if np.asarray(a).dtype.kind == "f"]
    for a in arrays + [np.asarray(dout)]:
        assert np.all(np.abs(a) > 1e-3) and not np.any(np.isclose(a, 1.0, atol=1e-3)), "zeros or ones hide mistakes"
    for a in arrays:
        if a.ndim == 2:
            assert a.shape[0] != a.shape[1] or name == "block"  # the block's C x C projections are caught by value
    if name == "embedding":
        ids, counts = np.unique(inputs["ids"], return_counts=True)
        assert counts.max() > 1 and len(ids) < inputs["W"].shape[0]  # repeats, and unused rows


def test_unknown_exercise_lists_the_valid_ones(tmp_path):
    with pytest.raises(UnknownExercise, match="choose from: linear, embedding, layer_norm"):
        run_check("conv2d", tmp_path / "x.py")


def test_layer_norm_walkthrough_fails_the_first_try_with_both_hints_then_passes(tmp_path):
    first, fixed = layer_norm_walkthrough(tmp_path)
    assert [g.name for g in first.wrong] == ["dx", "dshift"]
    assert "missing the path through rstd" in first.wrong[0].hint
    assert "missing the sum over a broadcast axis" in first.wrong[1].hint and "(size 3 = T)" in first.wrong[1].hint
    assert fixed.passed and "PASS: all 3 gradients right" in fixed.report()


def test_checker_refuses_to_judge_when_the_engine_disagrees_with_finite_differences(tmp_path, monkeypatch):
    correct = F.LayerNorm.backward
    monkeypatch.setattr(F.LayerNorm, "backward", staticmethod(lambda ctx, grad: tuple(g * 1.01 for g in correct(ctx, grad))))
    with pytest.raises(RuntimeError, match="tinygpt's backward and finite differences disagree on dx"):
        run_check("layer_norm", solution_file(tmp_path, "layer_norm"))
