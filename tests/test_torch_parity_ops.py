"""Parity with PyTorch: every functional op and every Tensor op gives the forward values and
the input gradients that PyTorch gives for the same inputs and the same upstream gradient.

Each test builds tinygpt leaves and torch leaves from the same NumPy arrays, runs the op on
both, backpropagates one random upstream gradient G through both (`out.backward(G)`), and
compares the outputs and the gradient of every input on the host.

Tolerances. float64: rtol 1e-10, atol 1e-12; float32: rtol 1e-5, atol 1e-6. An entry near
zero is the result of cancelling terms, and its rounding error is set by the size of those
terms, not by its own, so the atol is multiplied by max(1, largest |value| of the array):
the inputs are O(1), and an array of larger values came from larger terms. Where the exact
gradient is 0 (softmax over one key) torch returns rounding noise, ~1e-9 in float32, which
this atol accepts. The GPT-2-size cross-entropy test, whose gradients are ~1e-7, uses rtol
alone. tinygpt's results must also have torch's dtype: float32 in, float32 out, gradients
included.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import pytest
from conftest import host

import tinygpt as tg
import tinygpt.functional as F

torch = pytest.importorskip("torch", reason="PyTorch not installed: parity tests skipped")
TF = torch.nn.functional

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
TOLERANCES = {np.dtype(np.float32): (1e-5, 1e-6), np.dtype(np.float64): (1e-10, 1e-12)}


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float | None = None, atol: float | None = None) -> None:
    """`actual` (tinygpt) matches `expected` (torch) in dtype, shape and value.
    Default tolerances come from the dtype, atol scaled by max(1, largest finite |expected|)."""
    assert actual.dtype == expected.dtype, f"{what}: tinygpt gives dtype {actual.dtype}, torch gives {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: tinygpt gives shape {actual.shape}, torch gives {expected.shape}"
    default_rtol, default_atol = TOLERANCES[expected.dtype]
    if atol is None:
        finite = np.abs(expected[np.isfinite(expected)])
        atol = default_atol * max(1.0, float(finite.max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=default_rtol if rtol is None else rtol, atol=atol, err_msg=what)


def check_parity(tg_fn, torch_fn, arrays, dtype, seed: int = 0) -> None:
    """Compare tg_fn on tinygpt leaves with torch_fn on torch leaves made from the same
    `arrays` (cast to `dtype`): outputs, then every leaf's gradient after backpropagating
    the same random upstream gradient. Either fn may return a list of outputs (split)."""
    arrays = [np.asarray(a, dtype=dtype) for a in arrays]
    leaves = [tg.tensor(a, requires_grad=True, dtype=dtype) for a in arrays]
    torch_leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    outs, torch_outs = tg_fn(*leaves), torch_fn(*torch_leaves)
    if not isinstance(outs, (list, tuple)):
        outs, torch_outs = [outs], [torch_outs]
    assert len(outs) == len(torch_outs)

    rng = np.random.default_rng(seed)
    upstreams = []
    for i, (out, ref) in enumerate(zip(outs, torch_outs)):
        assert out.device == tg.default_device(), f"output {i} left the device: {out.device}"
        assert_close(host(out), ref.detach().numpy(), f"output {i}")
        upstreams.append(np.asarray(rng.standard_normal(tuple(ref.shape)), dtype=dtype))

    for out, upstream in zip(outs, upstreams):
        out.backward(tg.tensor(upstream, dtype=dtype))
    torch.autograd.backward(torch_outs, [torch.from_numpy(u) for u in upstreams])
    for i, (leaf, ref) in enumerate(zip(leaves, torch_leaves)):
        assert leaf.grad is not None, f"input {i} received no gradient"
        assert_close(host(leaf.grad), ref.grad.numpy(), f"gradient of input {i}")


def normal(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return scale * rng.standard_normal(shape)


def positive(rng: np.random.Generator, shape) -> np.ndarray:
    """Values in [0.2, ~3]: safe for log, sqrt, fractional powers and division."""
    return 0.2 + np.abs(rng.standard_normal(shape))


def away_from_zero(rng: np.random.Generator, shape) -> np.ndarray:
    """Either sign, |value| >= 0.5: a divisor whose quotient stays O(1)."""
    values = rng.standard_normal(shape)
    return np.where(values < 0, -0.5, 0.5) + values


# ============================================================================ functional ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("x_shape, out_features", [((5, 12), 8), ((2, 7, 12), 36), ((1, 1, 3), 1)])
def test_linear_matches_torch(device, dtype, bias, x_shape, out_features):
    rng = np.random.default_rng(1)
    arrays = [normal(rng, x_shape), normal(rng, (out_features, x_shape[-1]))]
    if bias:
        arrays.append(normal(rng, out_features))
    check_parity(F.linear, TF.linear, arrays, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids", [
    np.array([[0, 3, 3, 1, 0, 3, 9], [2, 2, 2, 2, 5, 0, 3]]),  # (B, T) with repeated ids
    np.array([4, 4, 4]),
    np.array([[7]]),
], ids=["2x7", "same_id_3x", "1x1"])
@pytest.mark.parametrize("ids_as_tensor", [False, True], ids=["ids_array", "ids_tensor"])
def test_embedding_matches_torch_with_repeated_ids(device, dtype, ids, ids_as_tensor):
    rng = np.random.default_rng(2)
    check_parity(lambda w: F.embedding(tg.tensor(ids) if ids_as_tensor else ids, w),
                 lambda w: TF.embedding(torch.from_numpy(ids), w),
                 [normal(rng, (10, 12))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(2, 7, 12), (5, 12), (1, 7, 12), (4, 3)])
def test_layer_norm_matches_torch(device, dtype, x_shape):
    rng = np.random.default_rng(3)
    channels = x_shape[-1]
    x = 1.5 + normal(rng, x_shape, scale=3.0)  # an offset and a spread for the normalisation to remove
    check_parity(lambda x, scale, shift: F.layer_norm(x, scale, shift, eps=1e-5),
                 lambda x, scale, shift: TF.layer_norm(x, (channels,), scale, shift, 1e-5),
                 [x, 1.0 + normal(rng, channels, 0.5), normal(rng, channels, 0.5)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(2, 7, 48), (1,)])
def test_gelu_matches_torch_tanh_approximation(device, dtype, x_shape):
    rng = np.random.default_rng(4)
    check_parity(F.gelu, lambda x: TF.gelu(x, approximate="tanh"), [normal(rng, x_shape, scale=3.0)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tg_fn, torch_fn", [(F.softmax, torch.softmax), (F.log_softmax, torch.log_softmax)],
                         ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("x_shape, axis", [((2, 7, 12), -1), ((2, 7, 12), 1), ((2, 7, 12), 0), ((3, 1), -1), ((1, 5), 0)])
def test_softmax_and_log_softmax_match_torch(device, dtype, tg_fn, torch_fn, x_shape, axis):
    rng = np.random.default_rng(5)
    check_parity(lambda x: tg_fn(x, axis=axis), lambda x: torch_fn(x, dim=axis), [normal(rng, x_shape, scale=4.0)], dtype)


def torch_attention(q, k, v, causal: bool):
    """PyTorch's reference. Its is_causal aligns the mask to the top-left; tinygpt puts the
    Tq queries at the last Tq of the Tk key positions (the KV-cache convention), so for
    Tq < Tk the causal mask is built explicitly: query i sees keys j <= i + (Tk - Tq)."""
    tq, tk = q.shape[-2], k.shape[-2]
    if causal and tq != tk:
        allowed = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + (tk - tq)
        return TF.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(allowed), dropout_p=0.0)
    return TF.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B, H, Tq, Tk, D, Dv", [
    (2, 3, 7, 7, 4, 4),  # training: Tq = Tk
    (2, 3, 3, 7, 4, 6),  # a chunk of queries after a cache of keys, Dv != D
    (1, 2, 1, 5, 8, 8),  # one decoding step
    (1, 1, 1, 1, 4, 4),
])
def test_scaled_dot_product_attention_matches_torch(device, dtype, causal, B, H, Tq, Tk, D, Dv):
    rng = np.random.default_rng(6)
    arrays = [normal(rng, (B, H, Tq, D)), normal(rng, (B, H, Tk, D)), normal(rng, (B, H, Tk, Dv))]
    check_parity(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=0.0),
                 lambda q, k, v: torch_attention(q, k, v, causal), arrays, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits_shape, targets, ignore_index", [
    ((6, 5), np.array([1, -100, 4, 0, -100, 4]), -100),
    ((1, 3), np.array([2]), -100),
    ((5, 4), np.array([2, 2, 0, 3, 1]), 2),  # a class id used as ignore_index
    ((2, 7, 12), np.array([[3, -100, 11, 0, 0, 5, -100], [1, 2, 3, -100, -100, -100, 7]]), -100),
], ids=["6x5", "1x3", "ignore_class_2", "2x7x12"])
def test_cross_entropy_matches_torch_with_ignored_targets(device, dtype, logits_shape, targets, ignore_index):
    rng = np.random.default_rng(7)
    classes = logits_shape[-1]
    check_parity(lambda z: F.cross_entropy(z, targets, ignore_index=ignore_index),
                 lambda z: TF.cross_entropy(z.reshape(-1, classes), torch.from_numpy(targets.reshape(-1)), ignore_index=ignore_index),
                 [normal(rng, logits_shape, scale=2.0)], dtype)


def test_cross_entropy_matches_torch_at_gpt2_vocabulary_size(device):
    """N = 64 rows over GPT-2's 50,257 tokens in float32. The gradient entries are ~1e-7, so
    each is checked to rtol 1e-5 of its own value, with no absolute slack."""
    rng = np.random.default_rng(8)
    rows, vocab = 64, 50257
    logits = rng.standard_normal((rows, vocab), dtype=np.float32) * np.float32(3.0)
    targets = rng.integers(0, vocab, rows)
    targets[::9] = -100
    upstream = np.asarray(rng.standard_normal(), dtype=np.float32)

    z = tg.tensor(logits, requires_grad=True)
    loss = F.cross_entropy(z, targets)
    loss.backward(tg.tensor(upstream))
    z_ref = torch.tensor(logits, requires_grad=True)
    loss_ref = TF.cross_entropy(z_ref, torch.from_numpy(targets))
    loss_ref.backward(torch.from_numpy(upstream))

    assert_close(host(loss), loss_ref.detach().numpy(), "loss", rtol=1e-5, atol=0.0)
    assert_close(host(z.grad), z_ref.grad.numpy(), "gradient of the logits", rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, training", [(0.0, True), (0.5, False), (0.0, False)])
def test_dropout_is_the_identity_like_torch_when_p_is_zero_or_not_training(device, dtype, p, training):
    rng = np.random.default_rng(9)
    check_parity(lambda x: F.dropout(x, p, training=training), lambda x: TF.dropout(x, p, training=training),
                 [normal(rng, (2, 7, 12))], dtype)


# ============================================================================ Tensor ops

BINARY_OPS = [operator.add, operator.sub, operator.mul, operator.truediv]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", BINARY_OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("a_shape, b_shape", [
    ((2, 7, 12), (2, 7, 12)),
    ((2, 7, 12), (12,)),
    ((2, 1, 12), (7, 1)),  # both sides broadcast
    ((1,), (3, 4)),
    ((), (3,)),
])
def test_arithmetic_with_broadcasting_matches_torch(device, dtype, op, a_shape, b_shape):
    rng = np.random.default_rng(10)
    check_parity(op, op, [normal(rng, a_shape), away_from_zero(rng, b_shape)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("expression", [
    lambda x: 2.5 - x, lambda x: 1 + x, lambda x: x * -2.0, lambda x: x / 3, lambda x: 3 / x, lambda x: -x,
], ids=["rsub", "radd", "mul_scalar", "div_scalar", "rdiv", "neg"])
def test_arithmetic_with_python_numbers_matches_torch(device, dtype, expression):
    rng = np.random.default_rng(11)
    check_parity(expression, expression, [away_from_zero(rng, (2, 7, 12))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exponent, signed", [(2, True), (3, True), (1, True), (0.5, False), (-1.5, False), (2.5, False)])
def test_power_matches_torch(device, dtype, exponent, signed):
    rng = np.random.default_rng(12)
    x = normal(rng, (2, 7, 12)) if signed else positive(rng, (2, 7, 12))
    check_parity(lambda x: x**exponent, lambda x: x**exponent, [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape, b_shape", [
    ((5, 12), (12, 8)),
    ((2, 7, 12), (12, 5)),  # a batch times a shared weight
    ((2, 3, 7, 4), (2, 3, 4, 7)),  # attention scores
    ((2, 1, 7, 4), (3, 4, 5)),  # broadcast leading axes
    ((12,), (12, 5)),
    ((5, 12), (12,)),
    ((12,), (12,)),
    ((1, 1), (1, 1)),
])
def test_matmul_matches_torch(device, dtype, a_shape, b_shape):
    rng = np.random.default_rng(13)
    check_parity(operator.matmul, operator.matmul, [normal(rng, a_shape), normal(rng, b_shape)], dtype)


def torch_reduction(name: str, x, axis, keepdims: bool):
    dim = tuple(range(x.ndim)) if axis is None else axis
    if name == "max":  # amax, like tinygpt, splits the gradient evenly between tied maxima
        return torch.amax(x, dim=dim, keepdim=keepdims)
    if name == "var":
        return torch.var(x, dim=dim, correction=0, keepdim=keepdims)
    return getattr(torch, name)(x, dim=dim, keepdim=keepdims)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sum", "mean", "max", "var"])
@pytest.mark.parametrize("x_shape, axis", [((2, 7, 12), None), ((2, 7, 12), 0), ((2, 7, 12), -1), ((2, 7, 12), (0, 2)),
                                           ((1, 5), 0), ((3, 1), 1)])
@pytest.mark.parametrize("keepdims", [False, True], ids=["dropdims", "keepdims"])
def test_reductions_match_torch(device, dtype, name, x_shape, axis, keepdims):
    rng = np.random.default_rng(14)
    check_parity(lambda x: getattr(x, name)(axis=axis, keepdims=keepdims),
                 lambda x: torch_reduction(name, x, axis, keepdims), [normal(rng, x_shape)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, -1, 0])
def test_max_splits_the_gradient_between_ties_like_torch_amax(device, dtype, axis):
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [5.0, -1.0, 4.0, 5.0]])
    check_parity(lambda x: x.max(axis=axis), lambda x: torch_reduction("max", x, axis, False), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_variance_with_ddof_one_matches_torch_unbiased_variance(device, dtype):
    rng = np.random.default_rng(15)
    check_parity(lambda x: x.var(axis=-1, ddof=1), lambda x: torch.var(x, dim=-1, correction=1), [normal(rng, (2, 7, 12))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["exp", "log", "tanh", "sqrt"])
@pytest.mark.parametrize("x_shape", [(2, 7, 12), (1,)])
def test_elementwise_functions_match_torch(device, dtype, name, x_shape):
    rng = np.random.default_rng(16)
    x = positive(rng, x_shape) if name in ("log", "sqrt") else normal(rng, x_shape, scale=2.0)
    check_parity(lambda x: getattr(x, name)(), lambda x: getattr(x, name)(), [x], dtype)


def torch_index(index):
    """The same index for a torch tensor: NumPy integer arrays become torch tensors."""
    if isinstance(index, tuple):
        return tuple(torch_index(i) for i in index)
    return torch.from_numpy(index) if isinstance(index, np.ndarray) else index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, index", [
    ((5, 12), [0, 2, 0, 0]),  # repeated rows: their gradients add up
    ((5, 12), (slice(None), [1, 1, 3])),
    ((5, 12), np.array([[0, 1], [1, 1]])),
    ((5, 12), (np.array([0, 0, 4]), np.array([3, 3, 3]))),  # the same element three times
    ((2, 7, 12), (slice(None), [6, 6, 0], slice(1, 4))),
    ((2, 7, 12), (slice(None), -1)),  # the last token, as when sampling
    ((5, 12), slice(1, 5, 2)),
    ((2, 7, 12), (Ellipsis, 0)),
    ((5, 12), 3),
    ((1, 12), (0, None)),
], ids=["rows_repeated", "cols_repeated", "2d_index", "pairs_repeated", "mixed", "last_token", "strided_slice",
        "ellipsis", "int", "newaxis"])
def test_indexing_matches_torch(device, dtype, x_shape, index):
    rng = np.random.default_rng(17)
    check_parity(lambda x: x[index], lambda x: x[torch_index(index)], [normal(rng, x_shape)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", [
    lambda x: x.reshape(14, 12),
    lambda x: x.reshape((2, 84)),
    lambda x: x.reshape(-1),
    lambda x: x.reshape(2, 7, 3, 4).transpose(1, 2),  # [B, T, C] -> [B, H, T, D]
    lambda x: x.transpose(0, 2),
    lambda x: x.transpose(-1, -2),
], ids=["reshape_args", "reshape_tuple", "flatten", "split_heads", "transpose_0_2", "transpose_negative"])
def test_reshape_and_transpose_match_torch(device, dtype, view):
    rng = np.random.default_rng(18)
    check_parity(view, view, [normal(rng, (2, 7, 12))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes, axis", [
    ([(2, 3, 12), (2, 1, 12), (2, 4, 12)], 1),
    ([(2, 7, 5), (2, 7, 7)], -1),
    ([(1, 7), (3, 7)], 0),
])
def test_cat_matches_torch(device, dtype, shapes, axis):
    rng = np.random.default_rng(19)
    check_parity(lambda *xs: tg.cat(xs, axis=axis), lambda *xs: torch.cat(xs, dim=axis),
                 [normal(rng, shape) for shape in shapes], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes, axis", [(4, -1), (5, -1), ([3, 4, 5], 2), (1, 0), (7, 1)],
                         ids=["qkv_thirds", "uneven_last", "list", "size_1_pieces", "one_piece"])
def test_split_matches_torch(device, dtype, sizes, axis):
    rng = np.random.default_rng(20)
    check_parity(lambda x: x.split(sizes, axis=axis), lambda x: torch.split(x, sizes, dim=axis),
                 [normal(rng, (2, 7, 12))], dtype)


CAUSAL_MASK = np.triu(np.ones((7, 7), dtype=bool), k=1)  # True above the diagonal: the future


@pytest.mark.parametrize("dtype", DTYPES)
def test_where_with_broadcast_operands_matches_torch(device, dtype):
    rng = np.random.default_rng(21)
    cond = rng.random((2, 7, 12)) < 0.5
    check_parity(lambda a, b: tg.where(cond, a, b), lambda a, b: torch.where(torch.from_numpy(cond), a, b),
                 [normal(rng, (2, 7, 12)), normal(rng, (12,))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_where_with_broadcast_condition_and_a_number_matches_torch(device, dtype):
    rng = np.random.default_rng(22)
    cond = rng.random((7, 1)) < 0.5
    check_parity(lambda a: tg.where(cond, a, 0.0), lambda a: torch.where(torch.from_numpy(cond), a, 0.0),
                 [normal(rng, (2, 7, 12))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_where_on_a_comparison_of_tensors_matches_torch(device, dtype):
    rng = np.random.default_rng(23)
    check_parity(lambda a, b: tg.where(a > b, a, b), lambda a, b: torch.where(a > b, a, b),
                 [normal(rng, (2, 7, 12)), normal(rng, (2, 7, 12))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [-1e4, -math.inf])
def test_masked_fill_matches_torch(device, dtype, value):
    rng = np.random.default_rng(24)
    check_parity(lambda x: x.masked_fill(CAUSAL_MASK, value), lambda x: x.masked_fill(torch.from_numpy(CAUSAL_MASK), value),
                 [normal(rng, (2, 3, 7, 7))], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_fill_with_minus_infinity_then_softmax_matches_torch(device, dtype):
    rng = np.random.default_rng(25)
    check_parity(lambda x: F.softmax(x.masked_fill(CAUSAL_MASK, -math.inf), axis=-1),
                 lambda x: torch.softmax(x.masked_fill(torch.from_numpy(CAUSAL_MASK), -math.inf), dim=-1),
                 [normal(rng, (2, 3, 7, 7))], dtype)
