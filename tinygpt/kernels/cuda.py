"""The fused ops' fast paths on CuPy: one CUDA kernel launch per op direction where the plain
math of functional.py and optim.py would launch a chain of elementwise operations.

Each function takes and returns raw CuPy arrays (float32 or float64) and computes what the
plain op of the same name computes; the math is in that op's docstring and repeated above
each kernel. Three kinds of kernel:
  elementwise  (GELU, cross-entropy backward, AdamW): CuPy's ElementwiseKernel writes the loop
               and the indexing; the body sees one element of each array, and `i`, the element's
               index in the (broadcast) output taken in C order.
  row          (layernorm, attention softmax, logsumexp): one thread block per row. Each thread
               walks the row with stride blockDim.x, then `block_reduce` combines the threads'
               partial sums or maxima. Raw CUDA, templated on T = float or double.
  reduction    (layernorm's dL/dscale): CuPy's ReductionKernel, a sum over rows.

The sources are plain strings in cuda_sources.py, so they can be read (and compile-checked by
tests/test_kernels.py) without CuPy; the CuPy kernel objects are built here on first use.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from tinygpt import backend
from tinygpt.backend import backend_of
from tinygpt.functional.dropout import drop_scale

from tinygpt.kernels.cuda_sources import (ADAMW_STEP, CROSS_ENTROPY_BACKWARD, GELU_BACKWARD, GELU_FORWARD,  # noqa: F401
                                             LAYER_NORM_GRAD_SCALE, ROW_KERNEL_NAMES, ROW_KERNEL_SOURCE, SWIGLU_BACKWARD,
                                             SWIGLU_FORWARD, ElementwiseSource, ReductionSource)

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_MAX_THREADS = 256


@functools.cache
def _row_module():
    import cupy

    names = [f"{name}<{ctype}>" for name in ROW_KERNEL_NAMES for ctype in _CTYPES.values()]
    return cupy.RawModule(code=ROW_KERNEL_SOURCE, name_expressions=names)


@functools.cache
def _elementwise(source: ElementwiseSource):
    import cupy

    return cupy.ElementwiseKernel(*source)


@functools.cache
def _reduction(source: ReductionSource):
    import cupy

    return cupy.ReductionKernel(*source)


def _launch_rows(name: str, dtype, rows: int, row_length: int, args: tuple) -> None:
    """Run row kernel `name` for `dtype`: one block per row, one thread per element up to
    _MAX_THREADS (rounded up to whole warps of 32)."""
    if dtype not in _CTYPES:
        raise TypeError(f"{name}: CUDA kernels take float32 or float64 arrays, got {dtype}")
    if rows == 0:
        return
    threads = min(_MAX_THREADS, 32 * max(1, -(-row_length // 32)))
    _row_module().get_function(f"{name}<{_CTYPES[dtype]}>")((rows,), (threads,), args)


def _check_in_place(name: str, a) -> None:
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: works in place on a C-contiguous array, got shape {a.shape} strides {a.strides}")


# ============================================================================ the interface


def matmul(a, b):
    """a @ b for 2-D arrays: cuBLAS already uses the whole GPU."""
    return a @ b


def embedding_backward(ids, grad_rows, vocab: int):
    """dW[v] = sum of the rows of grad_rows whose id is v (atomic adds on the GPU)."""
    import cupyx

    grad_w = backend_of(grad_rows).zeros((vocab, grad_rows.shape[1]), dtype=grad_rows.dtype)
    cupyx.scatter_add(grad_w, ids, grad_rows)
    return grad_w


def dropout(x, p: float, seed: int):
    """x * keep / (1 - p), keep = uniform >= p from the backend's generator (one piece)."""
    keep = backend.get_backend("cuda").uniform(x.shape, seed) >= p
    return x * keep * drop_scale(p)


ATTENTION_BLOCK_ELEMENTS = 1 << 24  # scores per block of queries (64 MB in float32): bounds attention's memory


def _query_blocks(q_shape, tk: int, dropout_p: float) -> list[tuple[int, int]]:
    """Blocks of queries whose scores, for every sequence at once, hold at most
    ATTENTION_BLOCK_ELEMENTS numbers. With dropout, one block: CuPy's generator cannot start
    a mask in the middle of its stream (backend.uniform), so the whole mask is drawn at once."""
    tq = q_shape[-2]
    per_query = max(1, math.prod(q_shape[:-2]) * tk)
    rows = tq if dropout_p > 0.0 else max(1, min(tq, ATTENTION_BLOCK_ELEMENTS // per_query))
    return [(i0, min(i0 + rows, tq)) for i0 in range(0, tq, rows)]


def _grouped(q, k, v):
    """Views in which each kv head meets its group of query heads by broadcasting (grouped-query
    attention, n = H / H_kv; n = 1 without it): q [..., H, Tq, D] as [..., H_kv, n, Tq, D], k and
    v [..., H_kv, Tk, *] as [..., H_kv, 1, Tk, *]. No repeated copy of k or v is made to keep."""
    if q.ndim < 3:
        return q, k, v
    kv_heads = k.shape[-3]
    grouped_q = q.reshape(*q.shape[:-3], kv_heads, q.shape[-3] // kv_heads, *q.shape[-2:])
    return grouped_q, k[..., None, :, :], v[..., None, :, :]


def _summed_over_group(a, q):
    """A gradient made per query head, [..., H_kv, n, Tk, *], summed into its kv head."""
    return a.sum(axis=-3) if q.ndim >= 3 else a


def _block_probs(q, k, i0: int, i1: int, causal: bool):
    """(P, kend): the softmax probabilities of queries i0:i1 against the keys they may see,
    k[..., :kend, :], by one batched product and the softmax row kernel in place. The row
    kernel places query r of the block at key position kend - (i1 - i0) + r, which is
    Tk - Tq + i0 + r, its place among all the queries."""
    xp = backend_of(q)
    kend = k.shape[-2] - q.shape[-2] + i1 if causal else k.shape[-2]
    p = xp.matmul(q[..., i0:i1, :], xp.swapaxes(k[..., :kend, :], -1, -2))  # [..., Bq, D] @ [..., D, kend]
    attention_softmax_(p, 1.0 / math.sqrt(q.shape[-1]), causal)
    return p, kend


def attention_forward(q, k, v, causal: bool, dropout_p: float, seed: int):
    """(out, lse, None): out as functional.ScaledDotProductAttention (k, v with H_kv heads,
    H_kv dividing H), computed in blocks of queries so that the scores never take more than one
    block's memory; lse [..., Tq] (float64) the log-sum-exp of each query's scores, kept for
    inspection (tinygpt trace): the backward reruns the softmax row kernel on each block's
    scores, which gives the forward's P exactly. No dropout mask is kept (None): the backward
    draws it again, as cheap on a GPU as reading it."""
    xp = backend_of(q)
    dtype = xp.result_type(q.dtype, k.dtype, v.dtype)
    q_g, k_g, v_g = _grouped(q, k, v)
    out = xp.empty((*q_g.shape[:-1], v.shape[-1]), dtype=dtype)
    lse = xp.empty(q_g.shape[:-1], dtype=xp.float64)
    for i0, i1 in _query_blocks(q.shape, k.shape[-2], dropout_p):
        p, kend = _block_probs(q_g, k_g, i0, i1, causal)
        lse[..., i0:i1] = _log_sum_exp(q_g[..., i0:i1, :], k_g[..., :kend, :], p)
        if dropout_p > 0.0:
            p = dropout(p, dropout_p, seed)  # [..., H_kv, n, Tq, Tk] is [..., H, Tq, Tk] in C order: the same mask
        out[..., i0:i1, :] = p @ v_g[..., :kend, :]  # [..., Bq, kend] @ [..., kend, Dv]
    return out.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1]), None


def _log_sum_exp(q, k, p):
    """L = s_j - log p_j for each query's most likely key j (p_j >= 1 / Tk, so its log is
    well conditioned), s_j = q . k_j / sqrt(D) recomputed in float64."""
    xp = backend_of(q)
    j = p.argmax(axis=-1)[..., None]  # [..., Bq, 1]
    k = xp.broadcast_to(k, (*j.shape[:-2], *k.shape[-2:]))  # a group's shared kv head, for each query head
    k_j = xp.take_along_axis(k, xp.broadcast_to(j, (*j.shape[:-1], k.shape[-1])), axis=-2)  # [..., Bq, D]
    s_j = (q.astype(xp.float64) * k_j).sum(axis=-1) / math.sqrt(q.shape[-1])
    return s_j - xp.log(xp.take_along_axis(p, j, axis=-1)[..., 0].astype(xp.float64))


def attention_backward(grad, q, k, v, out, lse, mask, causal: bool, dropout_p: float, seed: int, needs):
    """(dq, dk, dv), block by block: each block's probabilities recomputed, the softmax
    backward and the score scale in one row kernel, in place (which computes rowsum(dP * P)
    itself: out and lse are not needed, and mask is None). A kv head's gradients sum its group's."""
    xp = backend_of(q)
    need_q, need_k, need_v = needs
    q_g, k_g, v_g = _grouped(q, k, v)
    grad_g = grad.reshape(q_g.shape[:-1] + grad.shape[-1:])
    grad_q = xp.empty_like(q_g) if need_q else None
    grad_k = xp.zeros_like(k) if need_k else None
    grad_v = xp.zeros_like(v) if need_v else None
    for i0, i1 in _query_blocks(q.shape, k.shape[-2], dropout_p):
        p, kend = _block_probs(q_g, k_g, i0, i1, causal)
        g = grad_g[..., i0:i1, :]
        dropped = p if dropout_p == 0.0 else dropout(p, dropout_p, seed)
        if need_v:
            grad_v[..., :kend, :] += _summed_over_group(xp.swapaxes(dropped, -1, -2) @ g, q)
        dscores = g @ xp.swapaxes(v_g[..., :kend, :], -1, -2)  # dL/dP, through the dropout mask
        if dropout_p > 0.0:
            dscores = dropout(dscores, dropout_p, seed)
        dscores = xp.ascontiguousarray(dscores)
        softmax_backward_(dscores, p, 1.0 / math.sqrt(q.shape[-1]))
        if need_q:
            grad_q[..., i0:i1, :] = dscores @ k_g[..., :kend, :]
        if need_k:
            grad_k[..., :kend, :] += _summed_over_group(xp.swapaxes(dscores, -1, -2) @ q_g[..., i0:i1, :], q)
    return None if grad_q is None else grad_q.reshape(q.shape), grad_k, grad_v


def gelu_forward(x):
    """GELU(x), elementwise, any shape (see functional.GELU)."""
    return _elementwise(GELU_FORWARD)(x)


def gelu_backward(x, grad):
    """dL/dx = grad * GELU'(x), elementwise."""
    return _elementwise(GELU_BACKWARD)(x, grad.astype(x.dtype, copy=False))


def rms_norm_forward(x2, w, eps: float):
    """(y, xhat, rstd) for rows x2 [N, C] (see functional.RMSNorm), as CuPy array operations
    (no fused kernel yet)."""
    xp = backend_of(x2)
    rstd = 1.0 / xp.sqrt((x2 * x2).mean(axis=-1, keepdims=True) + eps)
    xhat = x2 * rstd
    return xhat * w, xhat, rstd


def rms_norm_backward(g2, xhat, rstd, w):
    """(dL/dx, dL/dw) of rms_norm_forward (see functional.RMSNorm), as CuPy array operations."""
    dxhat = g2 * w
    return rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)), (g2 * xhat).sum(axis=0)


def swiglu_forward(a, b):
    """silu(a) * b, elementwise (see functional.SwiGLU)."""
    return _elementwise(SWIGLU_FORWARD)(a, b.astype(a.dtype, copy=False))


def swiglu_backward(a, b, grad, need_a: bool):
    """(dL/da or None, dL/db) of y = silu(a) * b, elementwise."""
    grad_a, grad_b = _elementwise(SWIGLU_BACKWARD)(a, b.astype(a.dtype, copy=False), grad.astype(a.dtype, copy=False))
    return (grad_a if need_a else None), grad_b


def layer_norm_forward(x2, scale, shift, eps: float):
    """(y, xhat, rstd) for rows x2 [N, C]: y and xhat [N, C], rstd [N, 1] (see functional.LayerNorm)."""
    xp = backend_of(x2)
    dtype = xp.result_type(x2.dtype, scale.dtype, shift.dtype)  # as x * scale + shift would give
    x2, scale, shift = (xp.ascontiguousarray(a, dtype=dtype) for a in (x2, scale, shift))
    n, c = x2.shape
    y, xhat, rstd = xp.empty_like(x2), xp.empty_like(x2), xp.empty((n, 1), dtype=dtype)
    _launch_rows("layer_norm_forward", dtype, n, c, (x2, scale, shift, y, xhat, rstd, np.int64(c), dtype.type(eps)))
    return y, xhat, rstd


def layer_norm_backward(g2, xhat, rstd, scale):
    """(dL/dx [N, C], dL/dscale [C], dL/dshift [C]) from the gradient g2 [N, C] of y."""
    xp = backend_of(xhat)
    g2, xhat, rstd, scale = (xp.ascontiguousarray(a, dtype=xhat.dtype) for a in (g2, xhat, rstd, scale))
    n, c = xhat.shape
    grad_x = xp.empty_like(xhat)
    _launch_rows("layer_norm_backward", xhat.dtype, n, c, (g2, xhat, rstd, scale, grad_x, np.int64(c)))
    grad_scale = _reduction(LAYER_NORM_GRAD_SCALE)(g2, xhat, axis=0)  # sum_rows g * xhat, no [N, C] temporary
    return grad_x, grad_scale, g2.sum(axis=0)


def attention_softmax_(p, scale: float, causal: bool) -> None:
    """p = softmax(p * scale) along the last axis, in place, p [..., Tq, Tk] C-contiguous; when
    causal, key j is hidden from query i where j > i + (Tk - Tq)."""
    _check_in_place("attention_softmax_", p)
    tq, tk = p.shape[-2:]
    _launch_rows("attention_softmax", p.dtype, p.size // max(tk, 1), tk,
                 (p, np.int64(tq), np.int64(tk), p.dtype.type(scale), np.int32(bool(causal))))


def softmax_backward_(dp, p, scale: float) -> None:
    """dp = p * (dp - rowsum(dp * p)) * scale along the last axis, in place, dp C-contiguous."""
    _check_in_place("softmax_backward_", dp)
    if p.shape != dp.shape:
        raise ValueError(f"softmax_backward_: dp shape {dp.shape} and p shape {p.shape} differ")
    p = backend_of(p).ascontiguousarray(p, dtype=dp.dtype)
    tk = dp.shape[-1]
    _launch_rows("softmax_backward", dp.dtype, dp.size // max(tk, 1), tk, (dp, p, np.int64(tk), dp.dtype.type(scale)))


def logsumexp_rows(z):
    """lse [N] = log sum_j exp(z[:, j]) of z [N, V], max-shifted."""
    xp = backend_of(z)
    z = xp.ascontiguousarray(z)
    n, v = z.shape
    if v == 0:
        raise ValueError(f"logsumexp_rows: rows of z (shape {z.shape}) are empty")
    lse = xp.empty(n, dtype=z.dtype)
    _launch_rows("logsumexp_rows", z.dtype, n, v, (z, lse, np.int64(v)))
    return lse


def cross_entropy_backward(z, lse, t, weight):
    """dz [N, V] = (exp(z - lse[:, None]) - onehot(t)) * weight, with t [N] integer targets and
    weight [N, 1] (g / n on counted rows, 0 on ignored ones)."""
    lse, t, weight = lse.astype(z.dtype, copy=False), t.astype(np.int64, copy=False), weight.astype(z.dtype, copy=False)
    return _elementwise(CROSS_ENTROPY_BACKWARD)(z, lse[:, None], t[:, None], weight, z.shape[-1])  # [N, 1]s broadcast over V


def adamw_step_(w, g, m, v, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                step_size: float, rsqrt_correction: float) -> None:
    """One AdamW step on w, m, v in place (see optim.AdamW)."""
    _elementwise(ADAMW_STEP)(g.astype(w.dtype, copy=False), 1.0 - lr * weight_decay, beta1, beta2, eps, step_size,
                             rsqrt_correction, w, m, v)
