"""Attention in O(T) memory: FlashAttention-2's tiled forward and backward, as plain loops.

ScaledDotProductAttention (attention.py) makes the whole [..., Tq, Tk] matrix of probabilities
and keeps it for backward: at T = 4096, 12 heads and float32 that is 805 MB per layer. The op
here computes the same numbers one tile at a time, a block of queries against a block of keys,
and keeps only one number per query for backward. It is the lesson; the fast kernels
(kernels/cpu.py, kernels/cuda.py) use the same scheme behind scaled_dot_product_attention,
and tests/test_flash_attention.py checks all of them against the untiled op.
"""
from __future__ import annotations

import math

from tinygpt import op_checks
from tinygpt.backend import backend_of
from tinygpt.functional.gqa import repeat_kv, sum_groups
from tinygpt.tensor import Function, Tensor


def _swap(xp, a):
    return xp.swapaxes(a, -1, -2)


def _block_scores(xp, q, k, rows: slice, keys: slice, causal: bool, scale: float):
    """S = Q K^T / sqrt(D) for queries `rows` against keys `keys`, -inf where a key is in the
    query's future (query i sits at position Tk - Tq + i, as in attention.future_mask)."""
    tq, tk = q.shape[-2], k.shape[-2]
    s = q[..., rows, :] @ _swap(xp, k[..., keys, :]) * scale  # [..., bq, D] @ [..., D, bk] -> [..., bq, bk]
    if causal:
        future = xp.arange(keys.start, keys.stop)[None, :] > xp.arange(rows.start, rows.stop)[:, None] + (tk - tq)
        s = xp.where(future, -math.inf, s)
    return s


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _visible(rows: slice, keys: slice, tq: int, tk: int, causal: bool) -> bool:
    """Whether any query of `rows` may see any key of `keys` (the first key of the block is
    the one its last query is most likely to see)."""
    return not causal or keys.start <= rows.stop - 1 + (tk - tq)


class FlashAttention(Function):
    """out = softmax(Q K^T / sqrt(D)) V (-inf scores where a key is in the query's future, when
    causal): what ScaledDotProductAttention computes without dropout, tile by tile.

    Forward: the online softmax. Queries go in blocks of Bq rows; for each, the keys arrive in
    blocks of Bk. For each query row keep three running values over the keys seen so far:
        m  the largest score,   l = sum_j exp(s_j - m),   a = sum_j exp(s_j - m) v_j   (a row of D)
    starting from m = -inf, l = 0, a = 0. A new block of scores s (and values V_blk) updates them:
        m' = max(m, max_j s_j)
        l' = l exp(m - m') + sum_j exp(s_j - m')
        a' = a exp(m - m') + exp(s - m') V_blk
    exp(m - m') rescales the sums made against the old maximum to the new one, so every exp
    sees an argument <= 0 and cannot overflow, as in the max-shifted softmax. After the last
    block, out = a / l, which is softmax(s) V, and the row's log-sum-exp L = m + log l is kept:
    [..., Tq] numbers, not P [..., Tq, Tk]. (The first key block holds key 0, which every query
    may see, so m is finite from the first block on.) A key block wholly in the future of a
    query block is skipped: causal attention costs half the products.

    Backward. P is rebuilt tile by tile from L: P_ij = exp(S_ij - L_i), exactly the forward's
    probabilities. With g = dL/dout and tiles i (queries), j (keys):
        dV_j += P_ij^T g_i
        dP_ij = g_i V_j^T
        dS_ij = P_ij * (dP_ij - D_i)                 (the softmax backward)
        dQ_i += dS_ij K_j / sqrt(D),   dK_j += dS_ij^T Q_i / sqrt(D)
    The softmax backward needs a sum over the whole row, D_i = sum_j dP_ij P_ij, which no single
    tile holds; but sum_j (g_i . v_j) P_ij = g_i . (sum_j P_ij v_j) = g_i . out_i, so
    D = rowsum(g * out) is computed once, before the loop, from the saved output.
    FlashAttention-2 runs the key blocks in the outer loop, as here: a GPU thread block then
    owns dK_j and dV_j while the query blocks stream past, and adds into dQ_i.

    Grouped-query attention (k, v with fewer heads) is as in ScaledDotProductAttention: the
    tiles run on the kv heads repeated to every query head, and a kv head's gradient is the
    sum of its group's.

    Memory: q, k, v, out and L are kept; each tile makes [..., Bq, Bk] arrays and drops them.
    Dropout is left out of the lesson; the fast kernels draw a tile's part of the mask from
    its place in the random stream (backend.uniform's start), so they give the dropout masks
    of the untiled op.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-flash_attention]
    test_flash_attention.py::test_plain_flash_attention_equals_the_untiled_op (in tests/)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, block_size):
        xp = backend_of(q)
        ctx.group = q.shape[-3] // k.shape[-3] if q.ndim > 2 else 1  # n query heads per kv head
        k_h, v_h = repeat_kv(k, ctx.group), repeat_kv(v, ctx.group)  # [..., H_kv, Tk, D] -> [..., H, Tk, D]
        (*lead, tq, _), tk, dv = q.shape, k.shape[-2], v.shape[-1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        dtype = xp.result_type(q.dtype, k.dtype, v.dtype)
        out, lse = xp.empty((*lead, tq, dv), dtype=dtype), xp.empty((*lead, tq), dtype=dtype)
        for rows in _blocks(tq, block_size):
            m = xp.full((*lead, rows.stop - rows.start, 1), -math.inf, dtype=dtype)  # the running max,
            l = xp.zeros_like(m)                                                      # sum of exps
            a = xp.zeros((*lead, rows.stop - rows.start, dv), dtype=dtype)            # and weighted values
            for keys in _blocks(tk, block_size):
                if not _visible(rows, keys, tq, tk, causal):
                    break  # this key block and every later one are in the future of all these queries
                s = _block_scores(xp, q, k_h, rows, keys, causal, scale)
                m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
                rescale, p = xp.exp(m - m_new), xp.exp(s - m_new)
                l = l * rescale + p.sum(axis=-1, keepdims=True)
                a = a * rescale + p @ v_h[..., keys, :]  # [..., bq, bk] @ [..., bk, Dv]
                m = m_new
            out[..., rows, :] = a / l
            lse[..., rows] = (m + xp.log(l))[..., 0]
        ctx.causal, ctx.block_size, ctx.scale = causal, block_size, scale
        ctx.save_for_backward(q, k, v, out, lse)  # k, v unrepeated
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved
        xp = backend_of(grad)
        k_h, v_h = repeat_kv(k, ctx.group), repeat_kv(v, ctx.group)
        tq, tk = q.shape[-2], k.shape[-2]
        grad_q, grad_k, grad_v = xp.zeros_like(q), xp.zeros_like(k_h), xp.zeros_like(v_h)
        d = (grad * out).sum(axis=-1)  # D_i = rowsum(dP * P) = g_i . out_i: [..., Tq]
        for keys in _blocks(tk, ctx.block_size):
            for rows in _blocks(tq, ctx.block_size):
                if not _visible(rows, keys, tq, tk, ctx.causal):
                    continue
                s = _block_scores(xp, q, k_h, rows, keys, ctx.causal, ctx.scale)
                p = xp.exp(s - lse[..., rows, None])  # the forward's probabilities, rebuilt
                g = grad[..., rows, :]
                grad_v[..., keys, :] += _swap(xp, p) @ g  # [..., bk, bq] @ [..., bq, Dv]
                dp = g @ _swap(xp, v_h[..., keys, :])  # [..., bq, Dv] @ [..., Dv, bk]
                ds = p * (dp - d[..., rows, None]) * ctx.scale
                grad_q[..., rows, :] += ds @ k_h[..., keys, :]
                grad_k[..., keys, :] += _swap(xp, ds) @ q[..., rows, :]
        return grad_q, sum_groups(grad_k, ctx.group), sum_groups(grad_v, ctx.group)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, block_size: int = 64) -> Tensor:
    """scaled_dot_product_attention(q, k, v, causal) without dropout, computed in tiles of
    block_size queries x block_size keys (see FlashAttention): the memory of forward and
    backward grows with T, not T^2."""
    op_checks.attention(q, k, v, causal, 0.0)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"flash_attention: block_size must be a positive integer, got {block_size!r}")
    return FlashAttention.apply(q, k, v, causal=causal, block_size=block_size)
