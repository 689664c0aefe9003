"""The fused ops' fast paths on NumPy: the plain math of functional.py, blocked.

Every function computes what the op of the same name in functional.py computes (its
docstring there has the math), on row blocks of about 1 MB run side by side on a thread pool
(threads.run_blocks): a block stays in a core's cache while all its steps run, in place in a
buffer or two, and the blocks use every core. Rows of layer norm, GELU, dropout and
cross-entropy are independent; attention runs in blocks of queries (a sequence's blocks
side by side in the forward, one sequence per thread in the backward). The parameter
gradients that are sums over rows (layer norm's dscale and dshift) are summed per block and
the partial sums added at the end, so no two threads write the same memory.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from tinygpt import backend
from tinygpt.functional.attention import future_mask
from tinygpt.functional.dropout import drop_scale
from tinygpt.functional.activations import GELU_CUBIC, SQRT_2_OVER_PI
from tinygpt.kernels.threads import matmul as matmul  # the interface's matmul: split across the threads
from tinygpt.kernels.threads import num_threads, rows_per_block, run_blocks, run_rows


def _rows(x):
    """x as a 2-D array of rows, [..., C] -> [N, C] (a 0-d x as one 1 x 1 row)."""
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def _uniform(shape, seed: int, start: int):
    return backend.get_backend("cpu").uniform(shape, seed, start)


def embedding_backward(ids, grad_rows, vocab: int):
    """dW[v] = sum of the rows of grad_rows whose id is v. np.add.at adds one element at a
    time; sorting the ids and summing each run of equal ones with add.reduceat does the same
    in a few vectorised passes."""
    grad_w = np.zeros((vocab, grad_rows.shape[1]), dtype=grad_rows.dtype)
    if ids.size == 0:
        return grad_w
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]))
    grad_w[sorted_ids[starts]] = np.add.reduceat(grad_rows[order], starts, axis=0)
    return grad_w


def layer_norm_forward(x2, scale, shift, eps: float):
    dtype = np.result_type(x2.dtype, scale.dtype, shift.dtype)  # as x * scale + shift would give
    xhat, y = np.empty(x2.shape, dtype=dtype), np.empty(x2.shape, dtype=dtype)
    rstd = np.empty((x2.shape[0], 1), dtype=dtype)

    def block(s):
        mean = x2[s].mean(axis=-1, keepdims=True)
        np.subtract(x2[s], mean, out=xhat[s])
        var = (xhat[s] * xhat[s]).mean(axis=-1, keepdims=True)
        rstd[s] = 1.0 / np.sqrt(var + eps)
        xhat[s] *= rstd[s]
        np.multiply(xhat[s], scale, out=y[s])
        y[s] += shift

    run_rows(block, x2)
    return y, xhat, rstd


def layer_norm_backward(g2, xhat, rstd, scale):
    grad_x = np.empty_like(xhat)
    rows = rows_per_block(xhat.shape[1])
    partial_scale = np.zeros((-(-xhat.shape[0] // rows), xhat.shape[1]), dtype=xhat.dtype)  # one row per block
    partial_shift = np.zeros_like(partial_scale)

    def block(s):
        i = s.start // rows
        partial_shift[i] = g2[s].sum(axis=0)
        partial_scale[i] = (g2[s] * xhat[s]).sum(axis=0)
        dxhat = g2[s] * scale
        np.subtract(dxhat, dxhat.mean(axis=-1, keepdims=True), out=grad_x[s])
        dxhat *= xhat[s]
        grad_x[s] -= xhat[s] * dxhat.mean(axis=-1, keepdims=True)
        grad_x[s] *= rstd[s]

    run_blocks(block, xhat.shape[0], rows)
    return grad_x, partial_scale.sum(axis=0), partial_shift.sum(axis=0)


def _tanh_u(x, x_sq):
    """tanh(u), u = SQRT_2_OVER_PI x (1 + GELU_CUBIC x^2), computed in place in x_sq = x * x."""
    x_sq *= GELU_CUBIC
    x_sq += 1.0
    x_sq *= x
    x_sq *= SQRT_2_OVER_PI
    return np.tanh(x_sq, out=x_sq)


def gelu_forward(x):
    x2 = _rows(x)
    y = np.empty_like(x2)

    def block(s):
        t = _tanh_u(x2[s], np.multiply(x2[s], x2[s], out=y[s]))  # y = 0.5 x (1 + t)
        t += 1.0
        t *= x2[s]
        t *= 0.5

    run_rows(block, x2)
    return y.reshape(x.shape)


def gelu_backward(x, grad):
    x2 = _rows(x)
    g2 = grad.reshape(x2.shape)
    dx = np.empty_like(x2)

    def block(s):
        xs, dydx = x2[s], dx[s]
        x_sq = xs * xs
        np.multiply(x_sq, 3 * GELU_CUBIC, out=dydx)  # 0.5 x (1 - t^2) du/dx, du/dx = SQRT_2_OVER_PI (1 + 3 GELU_CUBIC x^2)
        dydx += 1.0
        dydx *= xs
        dydx *= 0.5 * SQRT_2_OVER_PI
        t = _tanh_u(xs, x_sq)
        dydx *= 1.0 - t * t
        t += 1.0                                     # + 0.5 (1 + t)
        t *= 0.5
        dydx += t
        dydx *= g2[s]

    run_rows(block, x2)
    return dx.reshape(x.shape)


def _sigmoid_into(a, out):
    """sigmoid(a) = 1 / (1 + exp(-a)) into out, as functional.sigmoid computes it: exp of -|a|
    only, so it never overflows, and (1 or e) / (1 + e) by the sign of a."""
    e = np.exp(-np.abs(a))
    np.add(e, 1.0, out=out)
    np.divide(np.where(a >= 0, 1.0, e), out, out=out)
    return out


def swiglu_forward(a, b):
    a2, b2 = _rows(a), _rows(b)
    y = np.empty_like(a2)

    def block(s):  # y = a sigmoid(a) b
        _sigmoid_into(a2[s], y[s])
        y[s] *= a2[s]
        y[s] *= b2[s]

    run_rows(block, a2)
    return y.reshape(a.shape)


def swiglu_backward(a, b, grad, need_a: bool):
    a2, b2, g2 = _rows(a), _rows(b), grad.reshape(_rows(a).shape)
    grad_a = np.empty_like(a2) if need_a else None
    grad_b = np.empty_like(a2)

    def block(rows):
        s = _sigmoid_into(a2[rows], np.empty_like(a2[rows]))
        silu = np.multiply(a2[rows], s, out=grad_b[rows])
        if need_a:  # dL/da = g b (s + silu (1 - s))
            da = np.subtract(1.0, s, out=grad_a[rows])
            da *= silu
            da += s
            da *= b2[rows]
            da *= g2[rows]
        silu *= g2[rows]  # dL/db = g silu(a)

    run_rows(block, a2)
    return (None if grad_a is None else grad_a.reshape(a.shape)), grad_b.reshape(a.shape)


def dropout(x, p: float, seed: int):
    x2 = _rows(x)
    y = np.empty_like(x2)
    scale = drop_scale(p)

    first = backend.mask_start(x.shape)

    def block(s):  # this block's part of the mask: from its first element's place in the stream
        keep = _uniform(x2[s].shape, seed, first + s.start * x2.shape[1]) >= p
        np.multiply(x2[s], keep, out=y[s])
        y[s] *= scale

    run_rows(block, x2)
    return y.reshape(x.shape)


@functools.lru_cache(maxsize=16)
def _causal_bias(n: int, dtype):
    """[n, n]: 0 where query i of a block may look at the block's key j, -inf where j > i
    (the triangle where a block of n queries meets its last n keys). Cached: every layer and
    step asks for the same few."""
    return np.where(future_mask(np, n, n), -math.inf, 0.0).astype(dtype)


def _heads_last(shape, dtype):
    """An empty [..., H, T, D] array laid out in memory as [..., T, H, D]: the heads' layout
    before attention, so joining them afterwards copies nothing."""
    if len(shape) < 3:
        return np.empty(shape, dtype=dtype)
    *lead, h, t, d = shape
    return np.swapaxes(np.empty((*lead, t, h, d), dtype=dtype), -2, -3)


# Attention, tiled over blocks of queries (FlashAttention-2's scheme, derived in
# functional/flash_attention.py). A block of queries against every key it may see is one
# [Bq, kend] array of scores, softmaxed whole (it holds whole rows, so no online softmax is
# needed: NumPy does best with few, large calls). The forward keeps each row's log-sum-exp
# L = m + log sum exp(s - m), [..., Tq], instead of the probabilities, [..., Tq, Tk]; the
# backward rebuilds a block's probabilities from it, P = exp(s - L). L is kept in float64:
# with float32 scores near 1e4, a float32 L would be 1e-3 off and the rebuilt rows would no
# longer add up to 1 (see _probabilities). Under causal attention a block stops at its last
# query's position, which skips the masked half of the products. Small problems (a decoding
# step: one query per head) run as one batched block, all sequences at once, to keep the
# NumPy calls few.

SMALL_ATTENTION = 1 << 18  # sequences x Tq x Tk up to which attention runs as one block (B=1, T=128:
                           # 0.9 ms, against 1.6 ms as 12 one-head tasks on two threads)


def attention_query_rows(tk: int) -> int:
    """Queries per block: a [Bq, Tk] block of about 128K elements (512 KB in float32, three
    of them fit in L2), between 16 and 128 rows (128 measured best at T = 256 and 1024:
    smaller blocks skip more of the causal half but make more NumPy calls)."""
    return max(16, min(128, (1 << 17) // max(tk, 1)))


class _AttentionTiles:
    """Where the blocks of one attention call are: sequences (the leading axes, flattened),
    query blocks, and each block's part of the dropout mask."""

    def __init__(self, q_shape, tk: int, causal: bool, dropout_p: float, seed: int):
        self.lead, self.tq, self.tk = q_shape[:-2], q_shape[-2], tk
        self.causal, self.dropout_p, self.seed = causal, dropout_p, seed
        self.sequences = math.prod(self.lead)
        self.whole = self.sequences * self.tq * tk <= SMALL_ATTENTION
        rows = self.tq if self.whole else attention_query_rows(tk)
        self.blocks = [(i0, min(i0 + rows, self.tq)) for i0 in range(0, self.tq, rows)]
        self.mask_start = backend.mask_start((*self.lead, self.tq, tk))  # a data-parallel shard's place

    def at(self, u: int) -> tuple:
        """The index of sequence u in the leading axes (all of them for a whole-problem block)."""
        return (...,) if self.whole else tuple(int(i) for i in np.unravel_index(u, self.lead))

    def keep(self, u: int, i0: int, i1: int, kend: int):
        """The dropout mask of queries i0:i1 of sequence u against keys :kend, or None: those
        rows of the whole [..., Tq, Tk] mask are one run of its random stream."""
        if self.dropout_p == 0.0:
            return None
        shape = (*self.lead, self.tq, self.tk) if self.whole else (i1 - i0, self.tk)
        first = self.mask_start + (0 if self.whole else (u * self.tq + i0) * self.tk)
        return _uniform(shape, self.seed, first)[..., :kend] >= self.dropout_p

    def run_sequences(self, fn) -> None:
        """fn(u) for every sequence, side by side on the threads."""
        if self.whole:
            fn(0)
            return
        run_blocks(lambda s: [fn(u) for u in range(s.start, s.stop)], self.sequences, 1)

    def run_query_blocks(self, fn) -> None:
        """fn(u, i0, i1) for every block of queries of every sequence, in runs of consecutive
        blocks on the threads (a batch of one sequence still uses every core)."""
        tasks = [(u, i0, i1) for u in range(1 if self.whole else self.sequences) for i0, i1 in self.blocks]
        run_blocks(lambda s: [fn(*t) for t in tasks[s]], len(tasks), max(1, len(tasks) // (4 * num_threads())))


def _scores(q, k, i0: int, i1: int, causal: bool, scale: float):
    """(S, kend): S = Q K^T / sqrt(D) for queries i0:i1 of q [..., Tq, D] against the keys
    they may see, k[..., :kend, :]. Causal: query i sits at position Tk - Tq + i, so the block
    sees keys up to Tk - Tq + i1 - 1, and its last i1 - i0 keys form a triangle hidden from the
    queries before them (-inf)."""
    tq, tk = q.shape[-2], k.shape[-2]
    kend = tk - tq + i1 if causal else tk
    s = q[..., i0:i1, :] @ np.swapaxes(k[..., :kend, :], -1, -2)  # [..., Bq, D] @ [..., D, kend]
    s *= scale
    if causal:
        s[..., kend - (i1 - i0):] += _causal_bias(i1 - i0, s.dtype)
    return s, kend


def attention_forward(q, k, v, causal: bool, dropout_p: float, seed: int):
    """(out, lse): out as functional.ScaledDotProductAttention; lse [..., Tq] (float64) the
    log-sum-exp of each query's scaled scores, from which attention_backward rebuilds P."""
    if q.ndim == 2:  # (T, D) inputs: one sequence
        out, lse = attention_forward(q[None], k[None], v[None], causal, dropout_p, seed)
        return out[0], lse[0]
    scale = 1.0 / math.sqrt(q.shape[-1])
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    out = _heads_last((*q.shape[:-1], v.shape[-1]), dtype)
    lse = np.empty(q.shape[:-1], dtype=np.float64)
    tiles = _AttentionTiles(q.shape, k.shape[-2], causal, dropout_p, seed)

    def block(u, i0, i1):
        at = tiles.at(u)
        p, kend = _scores(q[at], k[at], i0, i1, causal, scale)
        m = p.max(axis=-1, keepdims=True)
        p -= m  # softmax in place: the scores are not needed afterwards
        np.exp(p, out=p)
        total = p.sum(axis=-1, keepdims=True)
        p /= total
        lse[at][..., i0:i1] = (m.astype(np.float64) + np.log(total, dtype=np.float64))[..., 0]
        keep = tiles.keep(u, i0, i1, kend)
        if keep is not None:
            p *= keep
            p *= drop_scale(dropout_p)
        out[at][..., i0:i1, :] = p @ v[at][..., :kend, :]  # [..., Bq, kend] @ [..., kend, Dv]

    tiles.run_query_blocks(block)
    return out, lse


def _probabilities(s, lse):
    """P = exp(s - lse) in place in the scores s [..., Bq, kend], lse [..., Bq] float64. s - c,
    with c = lse rounded to s's dtype, is exact for the scores near the top of the row (those
    that matter), and the rounding of c is put back by one factor per row, exp(c - lse)."""
    c = lse.astype(s.dtype)
    s -= c[..., None]
    np.exp(s, out=s)
    if s.dtype != np.float64:
        s *= np.exp(c - lse)[..., None].astype(s.dtype)
    return s


def attention_backward(grad, q, k, v, lse, causal: bool, dropout_p: float, seed: int, needs):
    """(dq, dk, dv), one sequence per thread (its key and value gradients add up over its
    query blocks); each block's probabilities rebuilt from lse."""
    if q.ndim == 2:
        grads = attention_backward(grad[None], q[None], k[None], v[None], lse[None], causal, dropout_p, seed, needs)
        return tuple(None if g is None else g[0] for g in grads)
    need_q, need_k, need_v = needs
    scale = 1.0 / math.sqrt(q.shape[-1])
    grad_q = _heads_last(q.shape, q.dtype) if need_q else None
    grad_k = _heads_last(k.shape, k.dtype) if need_k else None
    grad_v = _heads_last(v.shape, v.dtype) if need_v else None
    tiles = _AttentionTiles(q.shape, k.shape[-2], causal, dropout_p, seed)

    def sequence(u):
        at = tiles.at(u)
        qs, ks, vs, gs, ls = q[at], k[at], v[at], grad[at], lse[at]
        dk = np.zeros(ks.shape, dtype=k.dtype) if need_k else None
        dv = np.zeros(vs.shape, dtype=v.dtype) if need_v else None
        for i0, i1 in tiles.blocks:
            p, kend = _scores(qs, ks, i0, i1, causal, scale)
            p = _probabilities(p, ls[..., i0:i1])
            keep, g = tiles.keep(u, i0, i1, kend), gs[..., i0:i1, :]
            if need_v:
                dropped = p if keep is None else p * keep * drop_scale(dropout_p)
                dv[..., :kend, :] += np.swapaxes(dropped, -1, -2) @ g
            dscores = g @ np.swapaxes(vs[..., :kend, :], -1, -2)  # dL/dP, through the dropout mask
            if keep is not None:
                dscores *= keep
                dscores *= drop_scale(dropout_p)
            dscores -= (dscores * p).sum(axis=-1, keepdims=True)  # softmax backward, times the score scale
            dscores *= p
            dscores *= scale
            if need_q:
                grad_q[at][..., i0:i1, :] = dscores @ ks[..., :kend, :]
            if need_k:
                dk[..., :kend, :] += np.swapaxes(dscores, -1, -2) @ qs[..., i0:i1, :]
        if need_k:
            grad_k[at] = dk
        if need_v:
            grad_v[at] = dv

    tiles.run_sequences(sequence)
    return grad_q, grad_k, grad_v


def logsumexp_rows(z):
    lse = np.empty(z.shape[0], dtype=z.dtype)

    def block(s):  # lse = m + log sum exp(z - m), m = max(z): exp never overflows
        m = z[s].max(axis=1, keepdims=True)
        e = z[s] - m
        np.exp(e, out=e)
        lse[s] = (m + np.log(e.sum(axis=1, keepdims=True)))[:, 0]

    run_rows(block, z)
    return lse


def cross_entropy_backward(z, lse, t, weight):
    dz = np.empty_like(z)

    def block(s):
        np.subtract(z[s], lse[s, None], out=dz[s])
        np.exp(dz[s], out=dz[s])  # softmax(z)
        dz[np.arange(s.start, s.stop), t[s]] -= 1.0
        dz[s] *= weight[s]

    run_rows(block, z)
    return dz


def adamw_step_(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction) -> None:
    """In place, on flat views updated block by block: each block is read from memory once
    for all the steps of the update. Arrays that are not contiguous get one block."""
    arrays = (w, g, m, v)
    if not all(a.flags.c_contiguous for a in arrays):
        _adamw_block(slice(None), arrays, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction)
        return
    flat = [a.reshape(-1) for a in arrays]
    run_blocks(functools.partial(_adamw_block, arrays=flat, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                 weight_decay=weight_decay, step_size=step_size, rsqrt_correction=rsqrt_correction),
               flat[0].size, 1 << 18)


def _adamw_block(s, arrays, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction) -> None:
    w, g, m, v = arrays
    if weight_decay:
        w[s] *= 1.0 - lr * weight_decay
    m[s] *= beta1
    m[s] += (1.0 - beta1) * g[s]
    v[s] *= beta2
    v[s] += (1.0 - beta2) * (g[s] * g[s])
    denom = np.sqrt(v[s])
    denom *= rsqrt_correction
    denom += eps
    np.divide(m[s], denom, out=denom)
    denom *= step_size
    w[s] -= denom
