"""Every op's hand-written backward agrees with float64 central differences (tg.gradcheck),
over hypothesis-drawn shapes with size-1, odd and broadcast dims, on every backend.

Also: the checker is shown failing on deliberately wrong backwards, and the fused
softmax-family ops stay finite and exact for logits of magnitude 1e4 in float32.
"""
from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.backend import backend_of
from tinygpt.gradcheck import GradcheckError
from conftest import host


def fuzz(max_examples: int):
    """Hypothesis settings for a test that also takes the function-scoped `device` fixture
    (the fixture only sets defaults, so reusing it across examples is safe)."""
    return settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None,
                    max_examples=max_examples)


seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 4)  # gradcheck runs two forwards per element: keep every array small


def shapes(min_dims: int = 1, max_dims: int = 3):
    return st.lists(dims, min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def broadcast_pairs(draw, max_dims: int = 3):
    """Two shapes that broadcast together: each is the full shape (or a suffix of it) with
    some dims squashed to 1, e.g. (3, 1, 4) with (4,) or (2, 1)."""
    full = draw(shapes(1, max_dims))

    def squash(shape):
        return tuple(1 if draw(st.booleans()) else n for n in shape)

    a, b = squash(full), squash(full[draw(st.integers(0, len(full))):])
    return (b, a) if draw(st.booleans()) else (a, b)


@st.composite
def axes(draw, ndim: int):
    """axis=None, a non-negative int, a negative int, or a tuple mixing both signs."""
    kind = draw(st.sampled_from(["none", "int", "negative", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(0, ndim - 1))
    if kind == "negative":
        return draw(st.integers(-ndim, -1))
    chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(a - ndim if draw(st.booleans()) else a for a in chosen)


def leaf(seed: int, shape, positive: bool = False, away_from_zero: bool = False) -> tg.Tensor:
    """A float32 leaf of standard-normal data; `positive` gives values in [0.5, ...) (log, sqrt),
    `away_from_zero` keeps the sign but puts |value| >= 0.5 (divisors)."""
    data = np.random.default_rng(seed).standard_normal(shape)
    if positive:
        data = 0.5 + np.abs(data)
    elif away_from_zero:
        data = np.sign(data + 1e-12) * (0.5 + np.abs(data))
    return tg.tensor(data, requires_grad=True)


def leaves(seed: int, *shape_list, **kwargs) -> list[tg.Tensor]:
    return [leaf(seed + i, shape, **kwargs) for i, shape in enumerate(shape_list)]


def check(fn, *inputs: tg.Tensor) -> None:
    assert tg.gradcheck(fn, inputs, raise_exception=True)


# ============================================================================ arithmetic

BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "div": lambda a, b: a / b}


@pytest.mark.parametrize("op", BINARY)
@fuzz(75)
@given(pair=broadcast_pairs(), seed=seeds)
@example(pair=((3, 1, 4), (5, 1)), seed=0)
@example(pair=((3, 1, 4), (4,)), seed=1)
@example(pair=((1,), (2, 3)), seed=2)
def test_binary_op_grads_match_finite_differences_under_broadcasting(device, op, pair, seed):
    a = leaf(seed, pair[0])
    b = leaf(seed + 1, pair[1], away_from_zero=(op == "div"))
    check(BINARY[op], a, b)


SCALAR_FORMS = {
    "x + 2": lambda x: x + 2.0, "1.5 + x": lambda x: 1.5 + x, "x - 3": lambda x: x - 3.0, "2 - x": lambda x: 2.0 - x,
    "3 * x": lambda x: 3.0 * x, "x * -0.5": lambda x: x * -0.5, "x / 4": lambda x: x / 4.0,
    "1.5 / x": lambda x: 1.5 / x, "-x": lambda x: -x,
}


@pytest.mark.parametrize("form", SCALAR_FORMS)
@fuzz(25)
@given(shape=shapes(), seed=seeds)
def test_scalar_operand_and_negation_grads_match_finite_differences(device, form, shape, seed):
    check(SCALAR_FORMS[form], leaf(seed, shape, away_from_zero=True))


@pytest.mark.parametrize("exponent", [2, 3, 1.0, 0.5, -1.5, 2.5])
@fuzz(25)
@given(shape=shapes(), seed=seeds)
def test_pow_with_scalar_exponent_grad_matches_finite_differences(device, exponent, shape, seed):
    # integer exponents are defined for any base; fractional ones only for positive bases
    x = leaf(seed, shape, positive=not float(exponent).is_integer())
    check(lambda x: x**exponent, x)


# ============================================================================ matmul


@st.composite
def matmul_shapes(draw):
    """(a_shape, b_shape) for every way `@` is used: 2-D, batched with broadcast batch dims
    (up to 4-D), a 3-D input against a 2-D weight and back, and the 1-D vector cases
    (vector @ vector, whose output is 0-d, is in test_scalar_output_grad_matches_finite_differences)."""
    m, k, n = draw(dims), draw(dims), draw(dims)
    case = draw(st.sampled_from(["2d", "batched", "3d@2d", "2d@3d", "vec@mat", "mat@vec", "vec@batch", "batch@vec"]))
    if case == "batched":
        batch_a, batch_b = draw(broadcast_pairs(max_dims=2))
        return batch_a + (m, k), batch_b + (k, n)
    b = draw(dims)
    return {"2d": ((m, k), (k, n)), "3d@2d": ((b, m, k), (k, n)), "2d@3d": ((m, k), (b, k, n)),
            "vec@mat": ((k,), (k, n)), "mat@vec": ((m, k), (k,)),
            "vec@batch": ((k,), (b, k, n)), "batch@vec": ((b, m, k), (k,))}[case]


@fuzz(250)
@given(pair=matmul_shapes(), seed=seeds)
@example(pair=((2, 1, 3, 2), (4, 2, 3)), seed=0)  # batch dims (2, 1) and (4,) broadcast to (2, 4)
@example(pair=((2, 3, 4), (4, 3)), seed=1)  # activations against a shared weight
def test_matmul_grads_match_finite_differences(device, pair, seed):
    a, b = leaves(seed, *pair)
    check(lambda a, b: a @ b, a, b)


# ============================================================================ indexing


def index_for(kind: str, shape, rng: np.random.Generator):
    """An index of the given kind for an array of `shape` (2 or 3 dims). Integer arrays always
    hold a repeated entry, so the backward must scatter-add rather than assign."""
    n0, n1 = shape[0], shape[1]
    rows = rng.integers(-n0, n0, size=3)
    rows = np.append(rows, rows[0])  # a repeat, possibly spelled negatively elsewhere
    cols = rng.integers(-n1, n1, size=4)
    cols[1] = cols[0]
    start = int(rng.integers(0, n0))
    if kind == "slice":
        return slice(start, int(rng.integers(start + 1, n0 + 1)), int(rng.integers(1, 3)))
    if kind == "negative_step":
        return (slice(None, None, -1), Ellipsis, slice(None, None, -2))
    if kind == "int_and_slice":
        return (-1, slice(None, None, -1))
    if kind == "int_array_repeats":
        return rows
    if kind == "int_list_repeats":
        return [int(r) for r in rows]
    if kind == "int_tensor_repeats":
        return tg.tensor(rows)
    if kind == "bool_mask":
        mask = rng.random(shape) < 0.5
        mask.flat[int(rng.integers(0, mask.size))] = True
        return mask
    if kind == "bool_rows":
        mask = rng.random(n0) < 0.5
        mask[start] = True
        return mask
    if kind == "array_then_slice":
        return (rows, slice(None, None, -1))
    if kind == "slice_then_array":
        return (slice(start, None), cols)
    if kind == "two_arrays":  # paired (row, col) picks, repeats included
        return (rows[:, None], cols[None, :2])
    raise AssertionError(kind)


INDEX_KINDS = ["slice", "negative_step", "int_and_slice", "int_array_repeats", "int_list_repeats", "int_tensor_repeats",
               "bool_mask", "bool_rows", "array_then_slice", "slice_then_array", "two_arrays"]


@pytest.mark.parametrize("kind", INDEX_KINDS)
@fuzz(40)
@given(shape=shapes(2, 3), seed=seeds)
def test_indexing_grad_matches_finite_differences(device, kind, shape, seed):
    index = index_for(kind, shape, np.random.default_rng(seed))
    check(lambda x: x[index], leaf(seed, shape))


def test_repeated_integer_index_accumulates_one_gradient_per_occurrence(device):
    x = tg.tensor([10.0, 20.0, 30.0], requires_grad=True)
    x[np.array([2, 0, 2, -1])].sum().backward()  # index 2 is picked three times (once as -1)
    np.testing.assert_array_equal(host(x.grad), [1.0, 0.0, 3.0])


# ============================================================================ shape ops


@st.composite
def reshape_targets(draw, shape):
    """A new shape for the same elements, written with a -1 the way users write it."""
    size = int(np.prod(shape))
    rows = draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    return draw(st.sampled_from([(rows, -1), (-1, rows), (rows, 1, -1), (size,)]))


@fuzz(75)
@given(shape=shapes(1, 4), seed=seeds, data=st.data())
def test_reshape_grad_matches_finite_differences(device, shape, seed, data):
    new_shape = data.draw(reshape_targets(shape))
    check(lambda x: x.reshape(*new_shape), leaf(seed, shape))


@fuzz(75)
@given(shape=shapes(1, 4), seed=seeds, data=st.data())
def test_transpose_grad_matches_finite_differences(device, shape, seed, data):
    axis1 = data.draw(st.integers(-len(shape), len(shape) - 1))
    axis2 = data.draw(st.integers(-len(shape), len(shape) - 1))
    check(lambda x: x.transpose(axis1, axis2), leaf(seed, shape))


@fuzz(100)
@given(shape=shapes(1, 3), seed=seeds, data=st.data())
def test_cat_grad_matches_finite_differences(device, shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    sizes = data.draw(st.lists(dims, min_size=1, max_size=3))  # each piece its own length along axis
    at = axis % len(shape)
    pieces = [leaf(seed + i, shape[:at] + (n,) + shape[at + 1:]) for i, n in enumerate(sizes)]
    check(lambda *xs: tg.cat(xs, axis=axis), *pieces)


@fuzz(100)
@given(shape=shapes(1, 3), seed=seeds, data=st.data())
def test_split_grad_matches_finite_differences(device, shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    sizes = data.draw(st.one_of(st.integers(1, n),  # one piece size; the last piece may be shorter
                                st.lists(st.integers(0, n), min_size=1, max_size=2).map(
                                    lambda cuts: np.diff([0, *sorted(cuts), n]).tolist())))

    def split_then_rejoin(x):
        # each piece is scaled differently, so a gradient routed to the wrong piece shows
        return tg.cat([piece * (i + 1.0) for i, piece in enumerate(x.split(sizes, axis=axis))], axis=axis)

    check(split_then_rejoin, leaf(seed, shape))


# ============================================================================ reductions


REDUCTIONS = {"sum": lambda x, axis, keepdims: x.sum(axis=axis, keepdims=keepdims),
              "mean": lambda x, axis, keepdims: x.mean(axis=axis, keepdims=keepdims),
              "max": lambda x, axis, keepdims: x.max(axis=axis, keepdims=keepdims),
              "var": lambda x, axis, keepdims: x.var(axis=axis, keepdims=keepdims)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@fuzz(100)
@given(shape=shapes(1, 3), seed=seeds, keepdims=st.booleans(), data=st.data())
def test_reduction_grad_matches_finite_differences(device, reduction, shape, seed, keepdims, data):
    axis = data.draw(axes(len(shape)))
    assume(np.empty(shape).sum(axis=axis, keepdims=keepdims).ndim > 0)  # 0-d outputs: see the next test
    # random floats have no ties, so max has a unique winner and a well-defined derivative
    check(lambda x: REDUCTIONS[reduction](x, axis, keepdims), leaf(seed, shape))


SCALAR_OUTPUTS = {  # fns of two (2, 3) leaves whose output is 0-d
    "x.sum()": lambda x, y: x.sum(),
    "x.sum(axis=(0, -1))": lambda x, y: x.sum(axis=(0, -1)),
    "x.mean()": lambda x, y: x.mean(),
    "x.var()": lambda x, y: x.var(),
    "vector @ vector": lambda x, y: x.reshape(-1) @ y.reshape(-1),
    "x.max()": lambda x, y: x.max(),
    "x.max(axis=(1, 0))": lambda x, y: x.max(axis=(1, 0)),
    "cross_entropy": lambda x, y: F.cross_entropy(x, np.array([2, 0])),
}


@pytest.mark.parametrize("name", SCALAR_OUTPUTS)
def test_scalar_output_grad_matches_finite_differences(device, name):
    # on NumPy, backward rules applied to 0-d arrays return NumPy scalars, which the next
    # backward rule must still accept (a crash here once broke x.mean().backward())
    check(SCALAR_OUTPUTS[name], *leaves(7, (2, 3), (2, 3)))


def test_mean_of_a_vector_backpropagates_one_over_n(device):
    x = tg.tensor([1.0, -2.0, 4.0, 0.5], requires_grad=True)
    x.mean().backward()
    np.testing.assert_allclose(host(x.grad), [0.25] * 4)


@fuzz(50)
@given(shape=shapes(1, 3), seed=seeds, data=st.data())
def test_unbiased_var_grad_matches_finite_differences(device, shape, seed, data):
    axis = data.draw(axes(len(shape)))
    if np.empty(shape).sum(axis=axis).size == np.prod(shape):  # fewer than 2 values per variance
        shape = shape + (2,)
        axis = -1
    check(lambda x: x.var(axis=axis, keepdims=True, ddof=1), leaf(seed, shape))


# ============================================================================ unary


UNARY = {"exp": lambda x: x.exp(), "log": lambda x: x.log(), "tanh": lambda x: x.tanh(), "sqrt": lambda x: x.sqrt()}


@pytest.mark.parametrize("name", UNARY)
@fuzz(50)
@given(shape=shapes(1, 3), seed=seeds)
def test_unary_op_grad_matches_finite_differences(device, name, shape, seed):
    check(UNARY[name], leaf(seed, shape, positive=name in ("log", "sqrt")))


# ============================================================================ where, masked_fill


@fuzz(100)
@given(pair=broadcast_pairs(), seed=seeds)
@example(pair=((3, 1, 4), (5, 1)), seed=0)
def test_where_grad_matches_finite_differences_for_both_branches(device, pair, seed):
    a, b = leaves(seed, *pair)
    cond = np.random.default_rng(seed).random(np.broadcast_shapes(*pair)) < 0.5
    check(lambda a, b: tg.where(cond, a, b), a, b)
    check(lambda a: tg.where(cond, a, -2.0), a)
    check(lambda b: tg.where(cond, 3.0, b), b)


@fuzz(100)
@given(pair=broadcast_pairs(), seed=seeds)
def test_masked_fill_grad_matches_finite_differences(device, pair, seed):
    x_shape, mask_shape = pair
    mask = tg.tensor(np.random.default_rng(seed).random(mask_shape) < 0.5)  # broadcasts against x
    # a moderate fill: -1e9 would add a 1e9 constant to the objective gradcheck differentiates,
    # and its rounding (1e9 * 1e-16 / eps) would swamp the finite differences
    check(lambda x: x.masked_fill(mask, -5.0), leaf(seed, x_shape))


# ============================================================================ functional


@fuzz(125)
@given(seed=seeds, lead=shapes(1, 2), in_features=dims, out_features=dims, bias=st.booleans())
@example(seed=0, lead=(2, 3), in_features=4, out_features=3, bias=True)  # (B, T, in) input
@example(seed=1, lead=(3,), in_features=2, out_features=4, bias=False)
def test_linear_grad_matches_finite_differences(device, seed, lead, in_features, out_features, bias):
    x, weight, b = leaves(seed, lead + (in_features,), (out_features, in_features), (out_features,))
    if bias:
        check(lambda x, w, b: F.linear(x, w, b), x, weight, b)
    else:
        check(lambda x, w: F.linear(x, w), x, weight)


@fuzz(100)
@given(seed=seeds, vocab=dims, dim=dims, ids_shape=shapes(1, 2), as_tensor=st.booleans())
def test_embedding_grad_wrt_weight_matches_finite_differences_with_repeated_ids(device, seed, vocab, dim, ids_shape,
                                                                                 as_tensor):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=ids_shape + (2,))
    ids[..., 1] = ids[..., 0]  # every id appears at least twice: its gradient rows must add up
    weight = leaf(seed, (vocab, dim))
    ids_arg = tg.tensor(ids) if as_tensor else ids
    check(lambda w: F.embedding(ids_arg, w), weight)


def test_embedding_grad_counts_each_occurrence_of_an_id(device):
    weight = tg.tensor(np.zeros((4, 2)), requires_grad=True)
    F.embedding(np.array([[3, 1, 3], [3, 0, 1]]), weight).sum().backward()
    np.testing.assert_array_equal(host(weight.grad), [[1, 1], [2, 2], [0, 0], [3, 3]])


@fuzz(125)
@given(seed=seeds, shape=shapes(1, 3))
def test_layer_norm_grad_matches_finite_differences(device, seed, shape):
    channels = shape[-1]
    x, scale, shift = leaves(seed, shape, (channels,), (channels,))
    check(lambda x, scale, shift: F.layer_norm(x, scale, shift), x, scale, shift)


@fuzz(100)
@given(seed=seeds, shape=shapes(1, 3))
def test_gelu_grad_matches_finite_differences(device, seed, shape):
    x = leaf(seed, shape)
    x.data *= 3  # reach the tails, where the tanh saturates
    check(F.gelu, x)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@fuzz(100)
@given(seed=seeds, shape=shapes(1, 3), data=st.data())
def test_softmax_family_grad_matches_finite_differences_along_any_axis(device, name, seed, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    fn = getattr(F, name)
    check(lambda x: fn(x, axis=axis), leaf(seed, shape))


@fuzz(150)
@given(seed=seeds, lead=shapes(1, 2), tq=st.integers(1, 3), tk=st.integers(1, 3), d=st.integers(1, 3),
       dv=st.integers(1, 3), causal=st.booleans(), dropout_p=st.sampled_from([0.0, 0.0, 0.3, 0.6]))
@example(seed=0, lead=(1, 2), tq=2, tk=3, d=2, dv=3, causal=True, dropout_p=0.0)  # fewer queries than keys
@example(seed=1, lead=(2, 1), tq=3, tk=3, d=2, dv=2, causal=True, dropout_p=0.5)
def test_attention_grad_matches_finite_differences(device, seed, lead, tq, tk, d, dv, causal, dropout_p):
    if causal and tq > tk:
        tq, tk = tk, tq
    q, k, v = leaves(seed, lead + (tq, d), lead + (tk, d), lead + (tk, dv))
    # gradcheck reseeds the library's generators before every evaluation, so dropout
    # draws the same mask in every forward and in backward
    check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p), q, k, v)


@fuzz(150)
@given(seed=seeds, lead=shapes(1, 2), classes=dims, ignore_index=st.sampled_from([-100, -1, 2]))
@example(seed=0, lead=(2, 3), classes=4, ignore_index=-100)  # (B, T, C) logits, (B, T) targets
def test_cross_entropy_grad_matches_finite_differences_with_ignored_targets(device, seed, lead, classes, ignore_index):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, size=lead)
    targets[rng.random(lead) < 0.4] = ignore_index
    targets.flat[0] = (ignore_index + 1) % classes  # at least one counted target
    logits = leaf(seed, lead + (classes,))
    check(lambda z: F.cross_entropy(z, targets, ignore_index=ignore_index), logits)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9, 1.0])
@fuzz(40)
@given(seed=seeds, shape=shapes(1, 3))
def test_dropout_grad_matches_finite_differences_in_training(device, p, seed, shape):
    check(lambda x: F.dropout(x, p, training=True), leaf(seed, shape))


def test_dropout_zeroes_some_elements_and_scales_the_rest(device):
    x = tg.tensor(np.random.default_rng(0).uniform(1.0, 2.0, size=(8, 16)), requires_grad=True)
    y = F.dropout(x, 0.25, training=True)
    y.sum().backward()
    kept = host(y) != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(host(y)[kept], host(x)[kept] / 0.75, rtol=1e-6)
    np.testing.assert_allclose(host(x.grad), kept / 0.75, rtol=1e-6)


@fuzz(40)
@given(seed=seeds, shape=shapes(1, 3))
def test_dropout_in_eval_mode_is_the_identity_with_identity_grad(device, seed, shape):
    x = leaf(seed, shape)
    np.testing.assert_array_equal(host(F.dropout(x, 0.5, training=False)), host(x))
    check(lambda x: F.dropout(x, 0.5, training=False), x)


# ============================================================================ compositions


@fuzz(60)
@given(seed=seeds, batch=st.integers(1, 2), steps=st.integers(1, 3), channels=st.integers(2, 3),
       hidden=st.integers(1, 4), vocab=st.integers(2, 3))
def test_layer_norm_linear_gelu_linear_cross_entropy_chain_grads_match_finite_differences(
        device, seed, batch, steps, channels, hidden, vocab):
    params = leaves(seed, (batch, steps, channels), (channels,), (channels,), (hidden, channels), (hidden,),
                    (vocab, hidden), (vocab,))
    targets = np.random.default_rng(seed).integers(0, vocab, size=(batch, steps))
    if targets.size > 1:
        targets[-1, -1] = -100  # an ignored position must contribute nothing

    def loss(x, scale, shift, w1, b1, w2, b2):
        h = F.gelu(F.linear(F.layer_norm(x, scale, shift), w1, b1))  # [B, T, C] -> [B, T, hidden]
        return F.cross_entropy(F.linear(h, w2, b2), targets)  # [B, T, hidden] -> [B, T, V] -> scalar

    check(loss, *params)


@fuzz(60)
@given(seed=seeds, shape=shapes(1, 3))
def test_tensor_used_twice_accumulates_both_gradients(device, seed, shape):
    x = leaf(seed, shape)
    check(lambda x: x * x + x, x)
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
