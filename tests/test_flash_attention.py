"""Tiled attention against the untiled op (functional.ScaledDotProductAttention, the reference):

  - the lesson op, functional/flash_attention.py, with blocks smaller than T;
  - the CPU kernel behind the fast scaled_dot_product_attention, with blocks of 3 queries on
    two threads, dropout included (its masks are drawn block by block), with and without the
    max-shift of the exponent, and as one batched block;
  - that neither keeps anything of size Tq x Tk (tracemalloc sees NumPy's allocations);
  - cuda.py's tiled glue on NumPy stand-ins for its row kernels.
Shapes are awkward on purpose: T not a multiple of the block, T = 1, one head, fewer queries
than keys (a KV cache), 2-D inputs, causal and not, grouped-query k and v (1 kv head, and
fewer kv heads than query heads), which no kernel may repeat to keep.
"""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import backend, kernels
from tinygpt.functional.flash_attention import flash_attention
from tinygpt.kernels import cpu, cpu_attention
from tinygpt.kernels import cuda as ck
from test_kernels import NumpyKernels

# (lead, tq, tk, d, dv, causal[, kv heads]): lead ends with the query heads
SHAPES = {
    "T=7, 3 heads": ((2, 3), 7, 7, 5, 4, True),
    "T=1": ((1, 2), 1, 1, 3, 3, True),
    "one head, T=5": ((3, 1), 5, 5, 2, 3, True),
    "fewer queries than keys": ((2, 2), 3, 8, 4, 2, True),
    "one query, 9 keys (decoding)": ((1, 4), 1, 9, 3, 3, True),
    "not causal, more queries than keys": ((2, 2), 6, 4, 3, 5, False),
    "2-D": ((), 5, 5, 2, 2, True),
    "6 heads on 2 kv heads, T=7": ((2, 6), 7, 7, 3, 4, True, 2),
    "4 heads on 1 kv head, fewer queries than keys": ((1, 4), 4, 9, 2, 3, True, 1),
    "3 heads on 1 kv head, not causal": ((2, 3), 5, 4, 3, 2, False, 1),
}


@pytest.fixture
def mode():
    before = tg.kernels_mode()
    yield tg.set_kernels
    tg.set_kernels(before)


def _inputs(lead, tq, tk, d, dv, causal=None, kv_heads=None, seed=0):
    """q, k, v; k and v with kv_heads heads in place of lead's last axis when given."""
    rng = np.random.default_rng(seed)
    kv_lead = lead if kv_heads is None else lead[:-1] + (kv_heads,)
    return [rng.standard_normal(s) for s in (lead + (tq, d), kv_lead + (tk, d), kv_lead + (tk, dv))]


def _run(fn, inputs, dtype):
    """fn's output and the gradients of sum(output * r), as NumPy arrays (the library's RNG
    reseeded, so dropout draws the same masks every time)."""
    tg.manual_seed(3)
    tensors = [tg.tensor(a, requires_grad=True, dtype=dtype) for a in inputs]
    out = fn(*tensors)
    r = np.random.default_rng(7).standard_normal(out.shape)
    (out * tg.tensor(r, dtype=dtype)).sum().backward()
    return [out.numpy()] + [t.grad.numpy() for t in tensors]


def _untiled(causal, dropout_p=0.0):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p)


def _assert_same(ours, reference, dtype):
    rtol, atol = (2e-5, 2e-6) if dtype == np.float32 else (1e-12, 1e-12)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, reference):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("block", [1, 2, 3, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_plain_flash_attention_equals_the_untiled_op(mode, shape, block):
    mode("plain")
    lead, tq, tk, d, dv, causal, *_ = SHAPES[shape]
    inputs = _inputs(*SHAPES[shape])
    tiled = _run(lambda q, k, v: flash_attention(q, k, v, causal=causal, block_size=block), inputs, np.float64)
    _assert_same(tiled, _run(_untiled(causal), inputs, np.float64), np.float64)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 queries on two threads, never one batched block: many blocks side by side,
    forward tasks of one kv head (a head's blocks are tasks of their own)."""
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "2")
    monkeypatch.setattr(cpu_attention, "attention_query_rows", lambda tk: 3)
    monkeypatch.setattr(cpu_attention, "SMALL_ATTENTION", 0)
    monkeypatch.setattr(cpu_attention, "TASK_SCORES", 1)


@pytest.mark.parametrize("shift", ["when needed", "always"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_tiled_kernel_equals_the_untiled_op(mode, small_blocks, monkeypatch, shape, dropout_p, dtype, shift):
    """"always": every block subtracts its rows' max (forward) or log-sum-exp (backward) before
    exp, the path scores too large for exp take; the inputs here never need it."""
    if shift == "always":
        monkeypatch.setattr(cpu_attention, "NO_SHIFT_LIMIT", {np.dtype(np.float32): 0.0, np.dtype(np.float64): 0.0})
    causal = SHAPES[shape][5]
    inputs, fn = _inputs(*SHAPES[shape]), _untiled(causal, dropout_p)
    mode("plain")
    reference = _run(fn, inputs, dtype)
    mode("fast")
    _assert_same(_run(fn, inputs, dtype), reference, dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_kernel_drawing_the_dropout_mask_again_equals_the_untiled_op(mode, small_blocks, monkeypatch, shape):
    """The forward keeps its dropout mask as bits for backward when they are small (every shape
    above); past that, backward draws it again from its place in the random stream."""
    monkeypatch.setattr(cpu_attention, "_keeps_mask", lambda q, tk, dropout_p: False)
    inputs, fn = _inputs(*SHAPES[shape]), _untiled(SHAPES[shape][5], 0.4)
    mode("plain")
    reference = _run(fn, inputs, np.float64)
    mode("fast")
    _assert_same(_run(fn, inputs, np.float64), reference, np.float64)


def test_dropout_mask_is_kept_as_bits_only_while_they_take_no_more_memory_than_q():
    q = np.zeros((1, 12, 4, 64), dtype=np.float32)  # 256 bytes a query: bits of up to 2048 keys
    assert cpu_attention._keeps_mask(q, 2048, 0.1) and not cpu_attention._keeps_mask(q, 2049, 0.1)
    assert not cpu_attention._keeps_mask(q, 256, 0.0)
    _, _, mask = cpu.attention_forward(q, q, q, True, 0.1, 0)
    assert mask.shape == (1, 12, 4, 1) and mask.dtype == np.uint8


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_cpu_kernel_as_one_batched_block_equals_the_untiled_op(mode, dropout_p):
    """Small problems (a decoding step) run all sequences in one block."""
    inputs, fn = _inputs((2, 6), 2, 6, 4, 4, kv_heads=3), _untiled(True, dropout_p)
    assert 2 * 6 * 2 * 6 <= cpu_attention.SMALL_ATTENTION
    mode("plain")
    reference = _run(fn, inputs, np.float64)
    mode("fast")
    _assert_same(_run(fn, inputs, np.float64), reference, np.float64)


def test_cpu_kernel_in_float32_with_scores_near_1e4_rebuilds_rows_that_add_up_to_1():
    """The backward rebuilds P from a float64 log-sum-exp: a float32 one would be 1e-3 off at
    scores of 1e4, every rebuilt row would miss 1 by about that much, and dq's first component
    (every key's is 100, so it is 50 x the row sum of dL/dS, which is 0) would be ~0.03 off."""
    rng = np.random.default_rng(6)
    q = rng.integers(-2, 3, size=(1, 2, 40, 4)).astype(np.float32)
    q[..., 0] = rng.choice([-1, 1], size=q.shape[:-1]) * rng.integers(150, 250, size=q.shape[:-1])
    k = rng.integers(-2, 3, size=(1, 2, 40, 4)).astype(np.float32)
    k[..., 0] = 100.0
    v, g = rng.standard_normal(k.shape).astype(np.float32), rng.standard_normal(k.shape).astype(np.float32)
    out, lse, mask = cpu.attention_forward(q, k, v, False, 0.0, 0)
    assert lse.dtype == np.float64 and np.abs(lse).min() > 5000 and mask is None
    dq, _, _ = cpu.attention_backward(g, q, k, v, out, lse, mask, False, 0.0, 0, (True, True, True))
    assert np.abs(dq[..., 0]).max() < 2e-3


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("which", ["fast kernel", "lesson op"])
def test_tiled_attention_never_holds_the_t_by_t_matrix(mode, monkeypatch, which):
    """Forward and backward at T = 2048, one head: the untiled op's probabilities alone take
    T^2 x 4 bytes = 16 MB; the tiled ones stay under a quarter of that."""
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    t, d = 2048, 16
    q, k, v = (tg.tensor(a, requires_grad=True) for a in _inputs((1, 1), t, t, d, d))
    tiled = {"fast kernel": _untiled(True), "lesson op": lambda q, k, v: flash_attention(q, k, v, block_size=64)}[which]

    def step(fn):
        fn(q, k, v).sum().backward()

    mode("fast")
    assert _peak_bytes(lambda: step(tiled)) < t * t * 4 / 4
    mode("plain")
    assert _peak_bytes(lambda: step(_untiled(True))) > t * t * 4  # the measure sees a T x T array when there is one


# ============================================================================ cuda.py on the host


@pytest.mark.parametrize("shape", ["T=7, 3 heads", "fewer queries than keys", "not causal, more queries than keys",
                                   "6 heads on 2 kv heads, T=7", "3 heads on 1 kv head, not causal"])
def test_cuda_tiled_glue_in_several_blocks_equals_the_untiled_op(mode, monkeypatch, shape):
    lead, tq, tk, d, dv, causal, *_ = SHAPES[shape]
    stand_in = NumpyKernels()  # cuda.py's row kernels, each its docstring's formula in NumPy
    monkeypatch.setattr(ck, "attention_softmax_", stand_in.attention_softmax_)
    monkeypatch.setattr(ck, "softmax_backward_", stand_in.softmax_backward_)
    monkeypatch.setattr(ck, "ATTENTION_BLOCK_ELEMENTS", math.prod(lead) * tk * 2)  # blocks of 2 queries
    monkeypatch.setattr(kernels, "module_of", lambda device: ck)
    inputs = _inputs(*SHAPES[shape])
    mode("fast")
    routed = _run(_untiled(causal), inputs, np.float64)
    blocks = -(-tq // 2)  # forward: a softmax per block; backward: the softmax again, then its backward
    assert stand_in.calls == ["attention_softmax_"] * blocks + ["attention_softmax_", "softmax_backward_"] * blocks
    monkeypatch.undo()
    mode("plain")
    _assert_same(routed, _run(_untiled(causal), inputs, np.float64), np.float64)


@pytest.mark.parametrize("mode_name", ["fast", "plain"])
def test_grouped_query_attention_keeps_only_the_unrepeated_k_and_v(mode, mode_name):
    """Each kv head is read by its group of query heads in place: what the op keeps for
    backward holds k and v with their 2 heads, no array of the 6 heads they serve."""
    mode(mode_name)
    q, k, v = (tg.tensor(a, requires_grad=True) for a in _inputs((1, 6), 3, 5, 4, 3, kv_heads=2))
    saved = F.scaled_dot_product_attention(q, k, v)._ctx.saved
    assert saved[1].shape == (1, 2, 5, 4) and saved[2].shape == (1, 2, 5, 3)
    assert not any(a.shape in ((1, 6, 5, 4), (1, 6, 5, 3)) for a in saved if a is not None)  # k or v repeated to 6 heads


def test_cuda_kernel_keeps_each_rows_log_sum_exp(monkeypatch):
    stand_in = NumpyKernels()  # cuda.py's row kernels, each its docstring's formula in NumPy
    monkeypatch.setattr(ck, "attention_softmax_", stand_in.attention_softmax_)
    monkeypatch.setattr(ck, "ATTENTION_BLOCK_ELEMENTS", 2 * 3 * 6 * 3)  # blocks of 3 queries
    q, k, v = _inputs((2, 3), 4, 6, 5, 5)
    _, lse, _ = ck.attention_forward(q, k, v, True, 0.0, 0)
    s = np.where(F.future_mask(np, 4, 6), -np.inf, q @ np.swapaxes(k, -1, -2) / math.sqrt(5))
    m = s.max(axis=-1)
    np.testing.assert_allclose(lse, m + np.log(np.exp(s - m[..., None]).sum(axis=-1)), rtol=1e-12)
    assert stand_in.calls == ["attention_softmax_"] * 2


# ============================================================================ on a GPU

_cuda_ok, _cuda_reason = backend.cuda_available()
needs_cuda = pytest.mark.skipif(not _cuda_ok, reason=f"CUDA kernels need CuPy and a GPU: {_cuda_reason}")


def _run_on(fn, inputs, dtype, device):
    tg.manual_seed(3)
    tensors = [tg.tensor(a, requires_grad=True, dtype=dtype, device=device) for a in inputs]
    out = fn(*tensors)
    r = np.random.default_rng(7).standard_normal(out.shape)
    (out * tg.tensor(r, dtype=dtype, device=device)).sum().backward()
    return [backend.to_host(out.data)] + [backend.to_host(t.grad.data) for t in tensors]


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", ["T=7, 3 heads", "fewer queries than keys", "not causal, more queries than keys", "2-D",
                                   "6 heads on 2 kv heads, T=7"])
def test_cuda_tiled_kernel_in_several_blocks_equals_the_plain_op_on_the_gpu(mode, monkeypatch, shape, dtype):
    lead, tq, tk, d, dv, causal, *_ = SHAPES[shape]
    monkeypatch.setattr(ck, "ATTENTION_BLOCK_ELEMENTS", max(1, math.prod(lead)) * tk * 2)  # blocks of 2 queries
    inputs, fn = _inputs(*SHAPES[shape]), _untiled(causal)
    mode("plain")
    reference = _run_on(fn, inputs, dtype, "cuda")
    mode("fast")
    _assert_same(_run_on(fn, inputs, dtype, "cuda"), reference, dtype)
    np.testing.assert_allclose(_run_on(lambda q, k, v: flash_attention(q, k, v, causal=causal, block_size=3), inputs,
                                       np.float64, "cuda")[0], reference[0], rtol=1e-5, atol=1e-6)


@needs_cuda
def test_cuda_tiled_attention_at_t_4096_holds_a_block_not_the_t_by_t_scores(mode, monkeypatch):
    """12 heads at T = 4096: P would be 805 MB; with blocks of 64M scores the step's pool
    stays far below it."""
    import cupy

    pool = cupy.get_default_memory_pool()
    q, k, v = (tg.tensor(a, requires_grad=True, device="cuda") for a in _inputs((1, 12), 4096, 4096, 64, 64))
    mode("fast")
    pool.free_all_blocks()
    before = pool.total_bytes()
    _untiled(True)(q, k, v).sum().backward()
    cupy.cuda.Device().synchronize()
    assert pool.total_bytes() - before < 12 * 4096 * 4096 * 4 / 2
