"""The exercises' checker: the answer key and tinygpt's own backward pass every exercise;
planted mistakes fail, each with the hint that names it; the catalogues and data flows agree with
the engine; inputs leave mistakes nowhere to hide. Backward functions are checked in-process
here (check_function, the same diagnosis as a file's check); the child-process path is tested
in test_exercise_cli.py and test_exercise_fooling.py."""
import textwrap

import numpy as np
import pytest

import tinygpt.functional as F
import tinygpt as tg
from tinygpt.exercises import (EXERCISES, UnknownExercise, catalogue, check_function, layer_norm_walkthrough, run_check,
                               sheet_text, start)
from tinygpt.exercises.block_case import STEPS, run_steps
from tinygpt.exercises.hints import same

NAMES = list(EXERCISES)


def backward_with(name, body=""):
    """A backward (checked in-process): the answer key's, with `body` (code that may change
    `grads`, a dict by gradient name) run before it returns."""
    source = textwrap.dedent(f"""\
        def backward(dout, cache):
            grads = reference(dout, cache)
            names = EXERCISES["{name}"].grads
            if not isinstance(grads, (tuple, dict)):
                grads = (grads,)
            grads = dict(grads) if isinstance(grads, dict) else dict(zip(names, grads))
        """) + textwrap.indent(textwrap.dedent(body), "    ") + "    return grads\n"
    scope = {"np": np, "EXERCISES": EXERCISES, "reference": EXERCISES[name].answer}
    exec(compile(source, f"<{name} backward>", "exec"), scope)
    return scope["backward"]


def planted(name, grad, code):
    return backward_with(name, f"g = grads[{grad!r}]\n{code}\ngrads[{grad!r}] = g\n")


@pytest.mark.parametrize("name", NAMES)
def test_answer_key_passes_every_exercise(name):
    result = check_function(name, EXERCISES[name].answer)
    assert result.passed, result.report()
    assert [g.name for g in result.grads] == list(EXERCISES[name].grads)
    assert all(g.status == "exact" and g.diff_numeric < 1e-7 for g in result.grads)
    assert "PASS" in result.report()


# (exercise, gradient, code changing g, words the hint must say): at least five per exercise
PLANTED = [
    ("linear", "dW", "g = g.T", "dW = x^T dy, the transpose"),
    ("linear", "dx", "g = 2 * g", "constant factor 2"),
    ("linear", "db", "g = dout.sum(axis=0)", "db summed over only one of the broadcast axes"),
    ("linear", "dW", "g = np.einsum('bto,bti->boi', dout, cache[0])", "missing the sum over a broadcast axis"),
    ("linear", "dW", "g = -g", "sign flipped"),
    ("linear", "db", "g = dout.mean(axis=(0, 1))", "db averaged over the rows"),
    ("embedding", "dW", "g = g.T", "the one-hot product in the wrong order"),
    ("embedding", "dW", "g = 2 * g", "constant factor 2"),
    ("embedding", "dW", "g = np.zeros_like(g)\ng[cache[1]] += dout", "a repeated id keeps one position, not the sum"),
    ("embedding", "dW", "g = -g", "sign flipped"),
    ("embedding", "dW", "g = g / 6", "dW divided by the number of positions"),
    ("layer_norm", "dx", "g = g.T", "transposed"),
    ("layer_norm", "dscale", "g = 2 * g", "constant factor 2"),
    ("layer_norm", "dshift", "g = dout.sum(axis=0)", "summed over only some of the broadcast axes"),
    ("layer_norm", "dx", "g = -g", "sign flipped"),
    ("layer_norm", "dshift", "g = dout.mean(axis=(0, 1))", "averaged over the rows instead of summed"),
    ("layer_norm", "dx", "x, scale, xhat, rstd = cache\ng = rstd * (dout * scale - (dout * scale).mean(axis=-1, keepdims=True))",
     "the path through rstd is missing"),
    ("gelu", "dx", "g = g.T", "transposed"),
    ("gelu", "dx", "g = 2 * g", "the 0.5 of y = 0.5 x (1 + tanh(u)) is missing"),
    ("gelu", "dx", "g = -g", "sign flipped"),
    ("gelu", "dx", "g = g / g.size", "off by a factor 1/30 (30 = B*T*C)"),
    ("gelu", "dx", "g = g / dout", "not multiplied by the upstream gradient"),
    ("softmax", "dx", "g = g.T", "transposed"),
    ("softmax", "dx", "g = 2 * g", "constant factor 2"),
    ("softmax", "dx", "g = -g", "sign flipped"),
    ("softmax", "dx", "y, = cache\ng = y * (dout - (dout * y).mean(axis=-1, keepdims=True))", "a mean over the row where the math has a sum"),
    ("softmax", "dx", "y, = cache\ng = y * (dout - dout * y)", "only the diagonal of the Jacobian"),
    ("attention", "dk", "g = g.swapaxes(-1, -2)", "transposed"),
    ("attention", "dv", "g = 2 * g", "constant factor 2"),
    ("attention", "dq", "g = -g", "sign flipped"),
    ("attention", "dv", "g = g / 5", "off by a factor 1/5 (5 = T)"),
    ("attention", "dq", "g = g * np.sqrt(7)", "the 1/sqrt(D) of S = Q K^T / sqrt(D) is missing"),
    ("cross_entropy", "dlogits", "g = g.T", "transposed"),
    ("cross_entropy", "dlogits", "g = 2 * g", "constant factor 2"),
    ("cross_entropy", "dlogits", "g = -g", "the sign of the whole gradient flipped"),
    ("cross_entropy", "dlogits", "g = g / 5", "divided by V (the classes)"),
    ("cross_entropy", "dlogits", "g = g / dout", "upstream gradient"),
    ("cross_entropy", "dlogits", "g = 6 * g", "the 1/N of the mean is missing"),
    ("rms_norm", "dx", "g = g.T", "transposed"),
    ("rms_norm", "dweight", "g = 2 * g", "constant factor 2"),
    ("rms_norm", "dx", "g = -g", "sign flipped"),
    ("rms_norm", "dweight", "g = dout.sum(axis=(0, 1))", "dweight without its factor xhat"),
    ("rms_norm", "dx", "x, w, xhat, rstd = cache\ng = rstd * dout * w", "rstd treated as a constant"),
    ("rope", "dx", "g = -g", "sign flipped"),
    ("rope", "dx", "g = g / 2", "constant factor 1/2"),
    ("rope", "dx", "g = dout", "the rotation treated as if it changed nothing"),
    ("rope", "dx", "positions, cos, sin = cache\ng = dout * cos", "the rotate_half(dy) * sin term is missing"),
    ("rope", "dx", "positions, cos, sin = cache\ng = dout * cos + np.concatenate([-dout[..., 4:], dout[..., :4]], -1) * sin",
     "R(a) dy, not R(a)^T dy"),
    ("swiglu", "dW_down", "g = g.T", "a weight's gradient transposed"),
    ("swiglu", "dW_up", "g = -g", "sign flipped"),
    ("swiglu", "dx", "g = 2 * g", "constant factor 2"),
    ("swiglu", "dW_gate", "g = g / 6", "off by a factor 1/6 (6 = B*T)"),
    ("swiglu", "dx", "c = cache\ng = (dout @ c['W_down'] * c['act']) @ c['W_up']", "dx from one of the two paths only"),
    ("gqa", "dk", "g = g / 2", "the mean of its group's gradients, not the sum"),
    ("gqa", "dv", "g = -g", "sign flipped"),
    ("gqa", "dq", "g = g * 7 ** 0.5", "in the attention step: the 1/sqrt(D) of S = Q K^T / sqrt(D) is missing"),
    ("gqa", "dk", "g = g.swapaxes(-1, -2)", "transposed"),
    ("gqa", "dv", "g = 2 * g", "constant factor 2"),
    ("flash_backward", "dq", "g = -g", "sign flipped"),
    ("flash_backward", "dv", "g = 2 * g", "constant factor 2"),
    ("flash_backward", "dk", "g = g * 5 ** 0.5", "the 1/sqrt(D) missing in dq and dk"),
    ("flash_backward", "dq", "g = g / 29", "off by a factor 1/29 (29 = Tq)"),
    ("flash_backward", "dk", "g = g / 3", "off by a factor 1/3 (3 = H)"),
    ("block", "W_1", "g = g.T", "transposed"),
    ("block", "W_q", "g = g.T", "transposed"),
    ("block", "h", "g = 2 * g", "in the step act = gelu(h): the 0.5 of y = 0.5 x (1 + tanh(u)) is missing"),
    ("block", "b_1", "g = grads['h'].sum(axis=0)", "a bias gradient summed over only one of the axes B and T"),
    ("block", "scores", "g = -g", "sign flipped"),
    ("block", "shift1", "g = g / 20", "in the step ln1 = layer_norm(x): dscale or dshift averaged"),
    ("block", "x1", "g = g - dout", "a residual path is missing"),
    ("block", "x", "g = g - grads['x1']", "a residual path is missing"),
    ("block", "ln1", "g = g - grads['k'].transpose(0, 2, 1, 3).reshape(5, 4, 6) @ cache['p']['W_k']",
     "from one or two of its three uses"),
]


@pytest.mark.parametrize("name,grad,code,words", PLANTED, ids=[f"{p[0]}-{p[1]}-{p[3]}" for p in PLANTED])
def test_planted_mistake_fails_with_the_hint_that_names_it(name, grad, code, words):
    result = check_function(name, planted(name, grad, code))
    assert not result.passed
    assert [g.name for g in result.wrong] == [grad], result.report()
    assert words in result.wrong[0].hint, result.wrong[0].hint
    assert words in result.report() and "FAIL" in result.report()


def test_every_fused_exercise_has_five_planted_mistakes():
    # a forward exercise (online_softmax) has no backward to plant into: its corpus entries are its planted mistakes
    assert all(sum(p[0] == name for p in PLANTED) >= 5 for name in NAMES
               if EXERCISES[name].difficulty != "warm-up" and EXERCISES[name].kind == "backward")


def test_wrong_gradient_names_its_worst_element_and_where_the_wrong_elements_are():
    result = check_function("linear", planted("linear", "dx", "g = g.copy()\ng[1, 2, 3] += 0.5"))
    (wrong,) = result.wrong
    index, theirs, expected, numeric = wrong.worst
    assert index == (1, 2, 3) and theirs == pytest.approx(expected + 0.5) and numeric == pytest.approx(expected, abs=1e-7)
    assert "1 of 24 elements are wrong, all in batch row 1 of axis 0" in wrong.where
    assert "no simple pattern" in wrong.hint and "every transpose that keeps its shape" in wrong.hint


def test_float32_gradients_are_close_and_pass_with_a_note():
    result = check_function("layer_norm", planted("layer_norm", "dx", "g = g.astype(np.float32)"))
    assert result.passed
    dx = result.grads[0]
    assert dx.status == "close" and 1e-9 < dx.diff_engine < 1e-5
    assert "close  max |yours - expected|" in result.report() and "dx is float32: accepted" in result.report()


def test_float16_gradient_fails_naming_its_dtype():
    result = check_function("gelu", planted("gelu", "dx", "g = g.astype(np.float16)"))
    assert not result.passed and "dx is float16: half precision" in result.report(0)


@pytest.mark.parametrize("code,words", [
    ("g = g + 0j", "dx is complex (complex128)"), ("g = g.astype(int)", "dx has dtype int64"),
    ("g = g.tolist()", "dx is a list of 2 items, not a NumPy array"), ("g = (v for v in g)", "dx is a generator"),
    ("g = float(g.sum())", "dx is a float, which has no shape"),
])
def test_a_gradient_that_is_not_a_float_array_gets_one_line(code, words):
    result = check_function("gelu", planted("gelu", "dx", code))
    assert not result.passed and words in result.report(0), result.report(0)


def test_block_first_wrong_follows_the_data_flow_and_later_ones_inherit():
    body = """
    c = cache
    dact = grads['act']
    grads['h'] = 2 * grads['h']
    grads['W_1'] = c['ln2'].reshape(-1, 6).T @ grads['h'].reshape(-1, 24)
    grads['W_1'] = grads['W_1'].T
    grads['b_1'] = grads['h'].sum(axis=(0, 1))
    grads['x'] = 2 * grads['x']
    """
    result = check_function("block", backward_with("block", body))
    assert [g.name for g in result.wrong] == ["h", "W_1", "b_1", "x"]
    assert result.first_wrong == "h"
    by_name = {g.name: g for g in result.wrong}
    assert by_name["W_1"].inherits == ("h",) and by_name["b_1"].inherits == ("h",)
    assert not by_name["x"].inherits  # x is computed from x1 and ln1, both right
    assert "the first gradient going backward that is wrong on its own is h" in result.report(1)


@pytest.mark.parametrize("pair", [("W_q", "W_k"), ("q", "k"), ("scale2", "shift2")])
def test_block_swapped_parameter_gradients_are_named_as_swapped(pair):
    a, b = pair
    result = check_function("block", backward_with("block", f"grads[{a!r}], grads[{b!r}] = grads[{b!r}], grads[{a!r}]\n"))
    wrong = {g.name: g for g in result.wrong}
    assert wrong[a].mistake == "swapped" and f"{a} and {b} are swapped" in wrong[a].hint
    assert result.first_wrong == a and "inherit" not in wrong[b].hint


def test_nan_hint_says_where_it_is_and_which_line_made_it_and_nothing_more():
    def backward(dy, cache):
        (x,) = cache
        c = np.sqrt(2 / np.pi)
        t = np.tanh(c * (x + 0.044715 * x**3))
        local = 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)
        return dy * local * np.sqrt(x) / np.sqrt(x)
    result = check_function("gelu", backward)
    hint = result.wrong[0].hint
    assert "not finite (NaN)" in hint and "invalid value in line" in hint and "np.sqrt(x)" in hint
    assert "mask" not in hint.lower()


def test_hint_levels_add_where_then_the_mistake():
    def backward(dy, cache):
        (y,) = cache
        return y * dy
    result = check_function("softmax", backward)
    level0, level1, level2 = (result.report(level) for level in (0, 1, 2))
    assert "where:" not in level0 and "hint:" not in level0 and "--hint" in level0
    assert "where: all 30 elements are wrong" in level1 and "hint:" not in level1 and "--hint 2" in level1
    assert "hint: the term - y_j sum_i dy_i y_i is missing" in level2


@pytest.mark.parametrize("name", NAMES)
def test_sheet_forward_is_the_engine_forward_and_its_backward_is_a_stub(tmp_path, name):
    exercise = EXERCISES[name]
    inputs, dout = exercise.draw(np.random.default_rng(0))
    if exercise.driver:  # a forward exercise: the sheet's loop with the answer key's functions gives the engine's outputs
        got, expected = getattr(exercise.sheet, exercise.driver)(exercise.answer, *inputs.values()), exercise.engine(inputs, dout)
        for value, name_ in zip(got, exercise.grads):
            np.testing.assert_allclose(value, expected[name_], rtol=1e-12, atol=1e-12)
        for function in exercise.fill:
            with pytest.raises(NotImplementedError):
                getattr(exercise.sheet, function)(*[None] * getattr(exercise.sheet, function).__code__.co_argcount)
        assert "raise NotImplementedError" in sheet_text(name) and start(name, tmp_path).read_text() == sheet_text(name)
        return
    out, cache = exercise.sheet.forward(*inputs.values())
    if exercise.flow is None:  # the block and the MLP are checked intermediate by intermediate below
        got = exercise.engine(inputs, dout)
        assert set(got) == set(exercise.grads)
    with pytest.raises(NotImplementedError):
        exercise.sheet.backward(dout, cache)
    text = sheet_text(name)
    assert start(name, tmp_path).read_text() == text
    assert "raise NotImplementedError" in text and "np.add.at" not in text and "swapaxes(-1, -2) @ dout" not in text


@pytest.mark.parametrize("name", ["linear", "embedding", "layer_norm", "gelu", "softmax", "cross_entropy", "attention",
                                  "rms_norm", "rope", "swiglu", "gqa", "flash_backward"])
def test_fused_sheet_forward_is_the_engine_forward(name):
    exercise = EXERCISES[name]
    inputs, _ = exercise.draw(np.random.default_rng(0))
    out, _ = exercise.sheet.forward(*inputs.values())
    args = [tg.tensor(a, dtype=np.float64) if a.dtype.kind == "f" else a for a in map(np.asarray, inputs.values())]
    engine_op = {"linear": F.linear, "embedding": lambda W, ids: F.embedding(ids, W), "layer_norm": F.layer_norm,
                 "gelu": F.gelu, "softmax": F.softmax, "cross_entropy": F.cross_entropy,
                 "attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
                 "rms_norm": lambda x, w: F.rms_norm(x, w, eps=1e-6), "rope": lambda x, p: F.rope(x, p, theta=100.0),
                 "swiglu": lambda x, g, u, d: F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d),
                 "gqa": lambda q, k, v: F.scaled_dot_product_attention(q, F.repeat_heads(k, 2), F.repeat_heads(v, 2)),
                 "flash_backward": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True)}[name]
    np.testing.assert_allclose(out, engine_op(*args).numpy(), rtol=1e-12, atol=1e-12)


def test_block_steps_compute_the_sheet_forward_intermediate_by_intermediate():
    exercise = EXERCISES["block"]
    inputs, _ = exercise.draw(np.random.default_rng(0))
    _, cache = exercise.sheet.forward(inputs["x"], inputs["p"])
    env = run_steps({"x": inputs["x"], **inputs["p"]})
    for name, _ in STEPS[:-1]:
        np.testing.assert_array_equal(env[name], cache[name], err_msg=name)


@pytest.mark.parametrize("name", ["block", "mlp"])
def test_data_flow_steps_give_the_engine_gradients(name):
    exercise = EXERCISES[name]
    inputs, dout = exercise.draw(np.random.default_rng(0))
    expected = exercise.engine(inputs, dout)
    ctx = catalogue.load(name).context(inputs, dout)
    ctx.d = {"out": np.asarray(dout), **expected}
    assert set(exercise.flow) == set(exercise.grads)
    for grad, (upstream, step) in exercise.flow.items():
        assert set(upstream) <= set(exercise.grads) | {"out"}
        np.testing.assert_allclose(step(ctx.d, ctx), expected[grad], rtol=1e-10, atol=1e-12, err_msg=grad)


@pytest.mark.parametrize("name", NAMES)
def test_catalogue_mistakes_are_wrong_distinct_and_explained(name):
    module = catalogue.load(name)
    exercise = EXERCISES[name]
    minimum = {"warm-up": 2, "hard": 10}.get(exercise.difficulty, 10) if name != "block" else 20
    assert len(module.MISTAKES) >= minimum
    assert len({m.key for m in module.MISTAKES}) == len(module.MISTAKES)
    inputs, dout = exercise.draw(np.random.default_rng(0))
    expected = exercise.engine(inputs, dout)
    ctx = module.context(inputs, dout)
    ctx.d = {"out": np.asarray(dout), **expected}
    for m in module.MISTAKES:
        assert len(m.lesson) > 40 and m.title, m.key
        for grad, values in m.wrong(ctx).items():
            assert grad in exercise.grads, (m.key, grad)
            for v in values if isinstance(values, list) else [values]:
                v = np.asarray(v)
                assert v.shape != expected[grad].shape or not same(v, expected[grad]), (m.key, grad)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_leave_mistakes_nowhere_to_hide(name):
    exercise = EXERCISES[name]
    sizes = list(exercise.dims.values())
    assert len(set(sizes)) == len(sizes), exercise.dims
    inputs, dout = exercise.draw(np.random.default_rng(0))
    arrays = [a for v in inputs.values() for a in (v.values() if isinstance(v, dict) else [v]) if np.asarray(a).dtype.kind == "f"]
    for a in arrays + ([np.asarray(dout)] if exercise.kind == "backward" else []):  # a forward exercise has no dout
        assert np.all(np.abs(a) > 1e-3) and not np.any(np.isclose(a, 1.0, atol=1e-3)), "zeros or ones hide mistakes"
    for a in arrays:
        if a.ndim == 2 and name not in ("block", "mul", "div", "add", "matmul", "mlp"):
            assert a.shape[0] != a.shape[1]
    if name == "embedding":
        ids, counts = np.unique(inputs["ids"], return_counts=True)
        assert counts.max() > 1 and len(ids) < inputs["W"].shape[0]  # repeats, and unused rows


def test_unknown_exercise_lists_the_valid_ones(tmp_path):
    with pytest.raises(UnknownExercise, match="choose from: add, mul, div"):
        run_check("conv2d", tmp_path / "x.py")


def test_layer_norm_walkthrough_fails_the_first_try_with_both_hints_then_passes(tmp_path):
    first, fixed = layer_norm_walkthrough(tmp_path)
    assert [g.name for g in first.wrong] == ["dx", "dshift"]
    assert first.wrong[0].mistake == "no-rstd-path" and "the path through rstd is missing" in first.wrong[0].hint
    assert first.wrong[1].mistake == "param-sum-axis" and "summed over only some of the broadcast axes" in first.wrong[1].hint
    assert fixed.passed and "PASS: all 3 gradients right" in fixed.report()


def test_checker_refuses_to_judge_when_the_engine_disagrees_with_finite_differences(monkeypatch):
    from tinygpt.exercises import checker

    numeric = checker._numeric
    monkeypatch.setattr(checker, "_numeric", lambda exercise, seed: {n: g * 1.01 for n, g in numeric(exercise, seed).items()})
    with pytest.raises(RuntimeError, match="tinygpt's backward and finite differences disagree on dx"):
        check_function("layer_norm", EXERCISES["layer_norm"].answer)


def test_softmax_recogniser_for_the_dropped_row_term_fires_despite_rounding():
    from tinygpt.exercises import hints

    exercise = EXERCISES["softmax"]
    inputs, dout = exercise.draw(np.random.default_rng(0))
    expected = exercise.engine(inputs, dout)["dx"]
    y = catalogue.load("softmax").context(inputs, dout).y
    hint = hints.softmax_row_term(y * dout, expected, hints.Case("dx", exercise.dims, inputs, dout))
    assert hint is not None and "missing the term - sum_i dy_i y_i" in hint


def test_block_nan_is_traced_to_the_step_that_made_it():
    result = check_function("block", backward_with("block", "grads['h'] = grads['h'].copy()\ngrads['h'][0, 0, 1] = np.nan\n"
                                                            "grads['W_1'] = grads['W_1'] * np.nan\n"))
    wrong = {g.name: g for g in result.wrong}
    assert result.first_wrong == "h" and "not finite (NaN): 1 of 480 elements" in wrong["h"].where
    assert wrong["W_1"].inherits == ("h",) and "computed from your h, which is not finite either" in wrong["W_1"].where
    assert "mask" not in result.report(2).lower()
