"""Every op's hand-written backward agrees with float64 central differences (tg.gradcheck)
on every backend: each case of the one list in tinygpt/opsuite.py, first on its examples,
then on hypothesis-drawn shapes and options with size-1, odd and broadcast dims.

Also: value checks the gradchecks cannot make (repeated indices add up, dropout scales),
the checker shown failing on deliberately wrong backwards, and the fused softmax-family
ops staying finite and exact for logits of magnitude 1e4 in float32.
"""
from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.backend import backend_of
from tinygpt.gradcheck import GradcheckError
from tinygpt.opcase import Case, FixedPicker, Picker
from tinygpt.opsuite import CASES
from conftest import host


def fuzz(max_examples: int):
    """Hypothesis settings for a test that also takes the function-scoped `device` fixture
    (the fixture only sets defaults, so reusing it across examples is safe)."""
    return settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None,
                    max_examples=max_examples)


class HypothesisPicker(Picker):
    """Draws every choice of a case from hypothesis, so a failure shrinks to a small case;
    leaf data comes from a NumPy generator seeded by one more draw."""

    def __init__(self, data, overrides):
        super().__init__(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed")), overrides)
        self._data = data

    def _integers(self, lo, hi, label):
        return self._data.draw(st.integers(lo, hi), label=label)

    def _sampled_from(self, values, label):
        return self._data.draw(st.sampled_from(values), label=label)


def leaf(seed: int, shape) -> tg.Tensor:
    """A float32 leaf of standard-normal data."""
    return tg.tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True)


def check(fn, *inputs: tg.Tensor) -> None:
    assert tg.gradcheck(fn, inputs, raise_exception=True)


def check_case(case: Case, pick: Picker) -> None:
    description = f"picks {pick.overrides}"
    try:
        description, fn, inputs, _ = case.run(pick)
        check(fn, *inputs)
    except Exception as error:
        error.add_note(f"case {case.name}: {description}")
        raise


@pytest.mark.parametrize("case, overrides, examples",
                         [pytest.param(case, overrides, examples, id=test_id)
                          for case in CASES for test_id, overrides, examples in case.variants()])
def test_op_grad_matches_finite_differences(device, request, case, overrides, examples):
    for seed, example in enumerate(examples):
        check_case(case, FixedPicker(np.random.default_rng(seed), example))

    @settings(max_examples=case.max_examples, deadline=None)
    @given(data=st.data())
    def drawn(data):
        check_case(case, HypothesisPicker(data, overrides))

    # hypothesis keys its database of failing examples by test function; like its pytest
    # plugin does for parametrized tests, add the node id so each case replays its own
    drawn.hypothesis.inner_test._hypothesis_internal_add_digest = request.node.nodeid.encode()
    drawn()


# ============================================================================ values a gradcheck cannot see


def test_repeated_integer_index_accumulates_one_gradient_per_occurrence(device):
    x = tg.tensor([10.0, 20.0, 30.0], requires_grad=True)
    x[np.array([2, 0, 2, -1])].sum().backward()  # index 2 is picked three times (once as -1)
    np.testing.assert_array_equal(host(x.grad), [1.0, 0.0, 3.0])


def test_mean_of_a_vector_backpropagates_one_over_n(device):
    x = tg.tensor([1.0, -2.0, 4.0, 0.5], requires_grad=True)
    x.mean().backward()
    np.testing.assert_allclose(host(x.grad), [0.25] * 4)


def test_embedding_grad_counts_each_occurrence_of_an_id(device):
    weight = tg.tensor(np.zeros((4, 2)), requires_grad=True)
    F.embedding(np.array([[3, 1, 3], [3, 0, 1]]), weight).sum().backward()
    np.testing.assert_array_equal(host(weight.grad), [[1, 1], [2, 2], [0, 0], [3, 3]])


def test_dropout_zeroes_some_elements_and_scales_the_rest(device):
    x = tg.tensor(np.random.default_rng(0).uniform(1.0, 2.0, size=(8, 16)), requires_grad=True)
    y = F.dropout(x, 0.25, training=True)
    y.sum().backward()
    kept = host(y) != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(host(y)[kept], host(x)[kept] / 0.75, rtol=1e-6)
    np.testing.assert_allclose(host(x.grad), kept / 0.75, rtol=1e-6)


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@fuzz(40)
@given(seed=st.integers(0, 2**32 - 1), shape=shapes)
def test_dropout_in_eval_mode_is_the_identity_with_identity_grad(device, seed, shape):
    x = leaf(seed, shape)
    np.testing.assert_array_equal(host(F.dropout(x, 0.5, training=False)), host(x))
    check(lambda x: F.dropout(x, 0.5, training=False), x)


@fuzz(30)
@given(seed=st.integers(0, 2**32 - 1), shape=shapes)
def test_tensor_used_twice_accumulates_both_gradients(device, seed, shape):
    x = leaf(seed, shape)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(host(x.grad), 2 * host(x).astype(np.float64) + 1, rtol=1e-6, atol=1e-6)


# ============================================================================ the checker fails on wrong gradients


class SquareWithHalfGradient(tg.Function):
    """y = x^2 with a deliberately wrong backward: grad * x instead of 2 * grad * x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return grad * x


class GeluWithoutTanhTerm(tg.Function):
    """GELU's forward with a deliberately wrong backward that keeps 0.5 (1 + t) but drops
    the 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) term."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1.0 + backend_of(x).tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        t = backend_of(x).tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
        return grad * 0.5 * (1.0 + t)


def test_gradcheck_returns_false_for_a_wrong_backward(device):
    x = leaf(3, (3, 4))
    assert tg.gradcheck(SquareWithHalfGradient.apply, [x]) is False
    assert tg.gradcheck(GeluWithoutTanhTerm.apply, [x]) is False
    assert tg.gradcheck(F.gelu, [x]) is True  # the same forward with the right backward passes


def test_gradcheck_error_names_the_worst_element_with_analytic_and_numeric_values(device):
    x = leaf(5, (3, 4))
    with pytest.raises(GradcheckError) as raised:
        tg.gradcheck(SquareWithHalfGradient.apply, [x], raise_exception=True)
    message = str(raised.value)
    found = re.search(r"input 0 \(shape \(3, 4\)\) element \((\d+), (\d+)\): analytic (\S+), numeric (\S+)", message)
    assert found, message
    index, analytic, numeric = (int(found[1]), int(found[2])), float(found[3]), float(found[4])

    # Independently, in numpy: gradcheck differentiates L = sum(x^2 * r), r the standard-normal
    # projection it draws from default_rng(0), in float64 from x's float32 values. The true
    # dL/dx = 2 r x; the wrong backward gives r x. The worst element exceeds
    # atol + rtol |numeric| (1e-5, 1e-3: the defaults) by the most.
    xs = host(x).astype(np.float64)
    r = np.random.default_rng(0).standard_normal(xs.shape)
    wrong, true = r * xs, 2 * r * xs
    excess = np.abs(wrong - true) - (1e-5 + 1e-3 * np.abs(true))
    assert index == np.unravel_index(excess.argmax(), xs.shape)
    assert analytic == pytest.approx(wrong[index], rel=1e-9)
    assert numeric == pytest.approx(true[index], rel=1e-6)
    assert numeric == pytest.approx(2 * analytic, rel=1e-6)


def test_gradcheck_report_separates_a_correct_backward_from_a_wrong_one(device):
    x = leaf(11, (2, 5))
    x.data *= 2
    right = tg.gradcheck_report(F.gelu, [x])
    wrong = tg.gradcheck_report(GeluWithoutTanhTerm.apply, [x])
    assert right.passed and right.max_abs_error < 1e-8 and right.checked == 10
    assert not wrong.passed and wrong.max_abs_error > 0.05 and wrong.checked == 10
    # the reported worst element really is off by the dropped term
    w = wrong.worst
    xi = host(x).astype(np.float64)[w["index"]]
    t = np.tanh(np.sqrt(2 / np.pi) * (xi + 0.044715 * xi**3))
    dropped = 0.5 * xi * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * xi**2)
    full = 0.5 * (1 + t) + dropped
    assert w["analytic"] / w["numeric"] == pytest.approx((full - dropped) / full, rel=1e-6)


@pytest.mark.parametrize("fn, passes", [(F.gelu, True), (SquareWithHalfGradient.apply, False)],
                         ids=["passing", "failing"])
def test_gradcheck_leaves_inputs_dtype_data_and_grad_as_they_were(device, fn, passes):
    x = leaf(2, (2, 3))
    x.grad = tg.tensor(np.full((2, 3), 7.0))
    data, grad = x.data, x.grad
    before = host(x).copy()
    assert tg.gradcheck(fn, [x]) is passes
    with contextlib.nullcontext() if passes else pytest.raises(GradcheckError):
        tg.gradcheck(fn, [x], raise_exception=True)
    assert x.dtype == np.float32 and tg.default_dtype() == np.float32
    assert x.data is data and x.grad is grad
    np.testing.assert_array_equal(host(x), before)
    np.testing.assert_array_equal(host(x.grad), np.full((2, 3), 7.0))


def test_gradcheck_restores_inputs_when_the_function_raises(device):
    x = leaf(4, (3,))
    data = x.data

    def broken(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tg.gradcheck(broken, [x])
    assert x.data is data and x.dtype == np.float32 and x.grad is None



# ============================================================================ stability at logits of 1e4

SHIFT = 8192.0  # a constant added to every logit; softmax and cross-entropy must not notice it


def huge_logits(seed: int, shape, axis: int = -1) -> np.ndarray:
    """Logits of magnitude 1e4 in float32. Half the entries sit within a few units of their
    row's maximum (so softmax is not simply one-hot), the rest up to ~1e4 below it (exp
    underflows to 0 there; log-softmax must still be finite). All values lie on a 1/64 grid,
    so they and their shifted copies are exact in float32 and the shift changes nothing."""
    rng = np.random.default_rng(seed)
    z = 1e4 * rng.standard_normal(shape)
    near_top = z.max(axis=axis, keepdims=True) - 3 * np.abs(rng.standard_normal(shape))
    z = np.where(rng.random(shape) < 0.5, near_top, z)
    return (np.round(z * 64) / 64).astype(np.float32)


def softmax_ref(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """float64 softmax with the max subtracted first."""
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_ref(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z.astype(np.float64)
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def forward_and_grad(fn, z: np.ndarray, upstream: np.ndarray):
    """fn's output and d(sum(output * upstream))/dz, both on the host."""
    x = tg.tensor(z, requires_grad=True)
    y = fn(x)
    y.backward(tg.tensor(upstream))
    return host(y), host(x.grad)


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_of_logits_near_1e4_is_finite_exact_and_shift_invariant(device, axis):
    z = huge_logits(0, (4, 6), axis)
    g = np.random.default_rng(1).standard_normal(z.shape).astype(np.float32)
    ref = softmax_ref(z, axis)
    ref_grad = ref * (g - (g * ref).sum(axis=axis, keepdims=True))
    for logits in (z, z + np.float32(SHIFT)):
        probs, grad = forward_and_grad(lambda x: F.softmax(x, axis=axis), logits, g)
        assert probs.dtype == np.float32 and np.isfinite(probs).all() and np.isfinite(grad).all()
        np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert 0.05 < ref.max(axis=axis).min() < 0.95  # some row is genuinely mixed, not one-hot


@pytest.mark.parametrize("axis", [-1, 0])
def test_log_softmax_of_logits_near_1e4_is_finite_exact_and_shift_invariant(device, axis):
    z = huge_logits(2, (4, 6), axis)
    g = np.random.default_rng(3).standard_normal(z.shape).astype(np.float32)
    ref = log_softmax_ref(z, axis)
    ref_grad = g - np.exp(ref) * g.sum(axis=axis, keepdims=True)
    assert ref.min() < -1000  # far-below entries: log(softmax) would be log(0) = -inf
    for logits in (z, z + np.float32(SHIFT)):
        logp, grad = forward_and_grad(lambda x: F.log_softmax(x, axis=axis), logits, g)
        assert np.isfinite(logp).all() and np.isfinite(grad).all()
        np.testing.assert_allclose(logp, ref, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_cross_entropy_of_logits_near_1e4_is_finite_exact_and_shift_invariant(device):
    z = huge_logits(4, (2, 3, 5)).reshape(2, 3, 5)
    targets = np.random.default_rng(5).integers(0, 5, size=(2, 3))
    targets[0, 0] = z[0, 0].argmax()  # a near-zero loss term next to terms of size ~1e4
    targets[1, 2] = -100
    flat_z, flat_t = z.reshape(-1, 5), targets.reshape(-1)
    counted = flat_t != -100
    logp = log_softmax_ref(flat_z)
    ref_loss = -logp[counted, flat_t[counted]].mean()
    onehot = np.eye(5)[np.where(counted, flat_t, 0)]
    ref_grad = ((np.exp(logp) - onehot) * counted[:, None] / counted.sum()).reshape(z.shape)
    for logits in (z, z + np.float32(SHIFT)):
        loss, grad = forward_and_grad(lambda x: F.cross_entropy(x, targets), logits, np.float32(1.0))
        assert np.isfinite(loss) and np.isfinite(grad).all()
        # float32 holds logsumexp ~ 1e4 only to ~1e-3 absolute (its ulp is 2^-10 there)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=2e-3)
        np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=2e-3 / counted.sum())


def attention_probs_ref(q, k, causal: bool):
    """float64 attention weights softmax(q k^T / sqrt(D)), masked and max-subtracted, and the scale."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    scale = 1 / np.sqrt(q.shape[-1])
    scores = q @ np.swapaxes(k, -1, -2) * scale
    if causal:
        tq, tk = scores.shape[-2:]
        scores = np.where(np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq), -np.inf, scores)
    return softmax_ref(scores), scale


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_scores_near_1e4_is_finite_exact_and_shift_invariant(device, causal):
    """Integer q and k with D = 4 make the scores (q.k / 2) exact in float32. The first
    component gives every score in a row the same ~1e4 offset, the rest spread them by a
    few units; adding a vector c to every key adds q.c to a whole row of scores, which
    attention must ignore."""
    rng = np.random.default_rng(6)
    shape = (1, 2, 3, 4)
    q = rng.integers(-2, 3, size=shape).astype(np.float32)
    q[..., 0] = rng.choice([-1, 1], size=shape[:-1]) * rng.integers(150, 250, size=shape[:-1])
    k = rng.integers(-2, 3, size=shape).astype(np.float32)
    k[..., 0] = 100.0
    v = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape)
    q64, k64, v64 = q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)
    probs, scale = attention_probs_ref(q, k, causal)
    assert np.abs(q @ np.swapaxes(k, -1, -2) * scale).min() > 5000
    assert 0.05 < probs.max(axis=-1).min() < 0.95  # some query attends to several keys
    # reference gradients, from the chain rule through out = P V, P = softmax(S), S = Q K^T scale
    d_probs = g @ np.swapaxes(v64, -1, -2)
    d_scores = probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True))
    products = [(probs, v64), (d_scores * scale, k64), (np.swapaxes(d_scores, -1, -2) * scale, q64),
                (np.swapaxes(probs, -1, -2), g)]
    refs = [a @ b for a, b in products]
    # float32 rounds each product's summands, which can cancel (dq's first component sums
    # terms of size ~10 to 0), so the tolerance follows the size of the summands
    atols = [1e-5 * (np.abs(a) @ np.abs(b)).max() for a, b in products]
    for keys in (k, k + np.array([37, -3, 5, 11], dtype=np.float32)):
        q_t, k_t, v_t = (tg.tensor(a, requires_grad=True) for a in (q, keys, v))
        out = F.scaled_dot_product_attention(q_t, k_t, v_t, causal=causal)
        out.backward(tg.tensor(g))
        results = [host(out), host(q_t.grad), host(k_t.grad), host(v_t.grad)]
        for name, result, ref, atol in zip(["out", "dq", "dk", "dv"], results, refs, atols):
            assert np.isfinite(result).all(), name
            np.testing.assert_allclose(result, ref, rtol=1e-4, atol=atol, err_msg=name)
