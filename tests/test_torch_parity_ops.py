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

import numpy as np
import pytest
from conftest import host

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.opcase import FixedPicker
from tinygpt.opsuite import CASES

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


def check_parity(tg_fn, torch_fn, arrays, dtype, seed: int = 0, rtol: float | None = None, atol: float | None = None) -> None:
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
        assert_close(host(out), ref.detach().numpy(), f"output {i}", rtol, atol)
        upstreams.append(np.asarray(rng.standard_normal(tuple(ref.shape)), dtype=dtype))

    for out, upstream in zip(outs, upstreams):
        out.backward(tg.tensor(upstream, dtype=dtype))
    torch.autograd.backward(torch_outs, [torch.from_numpy(u) for u in upstreams])
    for i, (leaf, ref) in enumerate(zip(leaves, torch_leaves)):
        assert leaf.grad is not None, f"input {i} received no gradient"
        assert_close(host(leaf.grad), ref.grad.numpy(), f"gradient of input {i}", rtol, atol)


def normal(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return scale * rng.standard_normal(shape)


def positive(rng: np.random.Generator, shape) -> np.ndarray:
    """Values in [0.2, ~3]: safe for log, sqrt, fractional powers and division."""
    return 0.2 + np.abs(rng.standard_normal(shape))


def away_from_zero(rng: np.random.Generator, shape) -> np.ndarray:
    """Either sign, |value| >= 0.5: a divisor whose quotient stays O(1)."""
    values = rng.standard_normal(shape)
    return np.where(values < 0, -0.5, 0.5) + values


# ============================================================================ the one table of op cases

SEEDS_PER_CASE = 3  # on top of each case's examples: data and the unpinned choices from these seeds
# The cases' arrays are tiny (a layer norm over 3 channels, say), so in float32 a value that
# comes from cancelling terms keeps fewer good digits than at the sizes above: atol 1e-5.
TABLE_TOLERANCES = {np.dtype(np.float32): (1e-5, 1e-5), np.dtype(np.float64): (1e-10, 1e-12)}


def _table():
    """(test id, case, pinned picks) for every case variant with a torch reference."""
    params = []
    for case in CASES:
        for test_id, overrides, examples in case.variants():
            probe = case.run(FixedPicker(np.random.default_rng(0), {**case.first_example(), **overrides}))
            if probe.reference is not None:
                params.append(pytest.param(case, overrides, examples, id=test_id))
    return params


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, overrides, examples", _table())
def test_every_op_case_matches_torch(device, dtype, case, overrides, examples):
    """Each case of tinygpt/opsuite.py that has a torch reference: its examples, then more
    seeds, outputs and every input's gradient against PyTorch's."""
    picks = [(seed, example) for seed, example in enumerate(examples)]
    picks += [(100 + seed, overrides) for seed in range(SEEDS_PER_CASE)]
    for seed, pinned in picks:
        built = case.run(FixedPicker(np.random.default_rng(seed), pinned, device))
        arrays = [host(x) for x in built.inputs]
        try:
            check_parity(built.fn, lambda *tensors: built.reference(torch, *tensors), arrays, dtype, seed,
                         *TABLE_TOLERANCES[np.dtype(dtype)])
        except AssertionError as error:
            error.add_note(f"case {case.name}: {built.description}")
            raise


# ============================================================================ functional ops


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

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, -1, 0])
def test_max_splits_the_gradient_between_ties_like_torch_amax(device, dtype, axis):
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [5.0, -1.0, 4.0, 5.0]])
    check_parity(lambda x: x.max(axis=axis), lambda x: torch.amax(x, dim=tuple(range(x.ndim)) if axis is None else axis), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_variance_with_ddof_one_matches_torch_unbiased_variance(device, dtype):
    rng = np.random.default_rng(15)
    check_parity(lambda x: x.var(axis=-1, ddof=1), lambda x: torch.var(x, dim=-1, correction=1), [normal(rng, (2, 7, 12))], dtype)


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
