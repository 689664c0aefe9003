"""Attention on the CPU, tiled: FlashAttention-2's scheme (derived in functional/flash_attention.py)
in blocks of queries, on the thread pool.

A block of queries against every key it may see is one [rows, kend] array of scores, softmaxed
whole (it holds whole rows, so no online softmax is needed: NumPy does best with few, large
calls). The forward keeps each row's log-sum-exp L = log sum_j exp(s_j), [..., Tq], instead of
the probabilities, [..., Tq, Tk]; the backward rebuilds a block's probabilities from it,
P = exp(s - L). L is kept in float64: with float32 scores near 1e4, a float32 L would be 1e-3
off and the rebuilt rows would no longer add up to 1. Under causal attention a block stops at
its last query's position, which skips the masked half of the products.

Grouped-query attention (k and v with H_kv heads, each shared by n = H / H_kv consecutive
query heads) reads the shared head directly: the n query heads of a group are stacked into
one matrix of n x rows queries, so one product per block reads the shared keys once, and the
backward's dK = dS^T Q of that product already sums the group's gradients into the shared
head. Nothing is repeated, and only the unrepeated k and v are kept.

Where the time goes (B=1, T=1024, 12 heads of 64, one core): the products are three quarters,
exp most of the rest; at small blocks, NumPy's cost per call (microseconds, whatever the size).
So a task batches several heads, and the elementwise work is cut to what the math needs: the
score scale multiplies the [rows, D] queries, not the [rows, kend] scores; the softmax's
division is done on the [rows, Dv] output; the max-shift of the exponent is skipped when no
score can overflow exp (_needs_shift); the backward's softmax term rowsum(dP * P) is dO . O,
one number per query from the saved output (as in the lesson). With dropout, drawing the mask
costs more than all that (about 2 ns a number): the forward keeps it as bits for the backward
while they are small (_keeps_mask). benchmarks/RESULTS.md (issue 21) has the figures.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from tinygpt import backend
from tinygpt.functional.attention import future_mask
from tinygpt.functional.dropout import drop_scale
from tinygpt.kernels.threads import num_threads, run_blocks

SMALL_ATTENTION = 1 << 18  # scores (sequences x H x Tq x Tk) up to which attention is one task on one thread: a
                           # decoding step, and a batch-1 forward up to T = 128, where BLAS's own threads still spin
                           # on the cores after the projections before it (threads.matmul) and two pool threads
                           # lose to one (0.9 against 1.3 ms at T = 128 after a 128-row product)
TASK_SCORES = 1 << 19  # scores per forward task: a task takes as many heads as fit (at small T one head is too
                       # small a task: each NumPy call costs microseconds whatever its size)

# |s| below which exp(s) needs no shift: exp(+-30) = 1e13, 1e-13 in float32 leave room for sums
# of Tk of them, and for the backward's row factor exp(-L) >= exp(-30 - log Tk) times a
# gradient to stay a normal number; float64 has room up to 300.
NO_SHIFT_LIMIT = {np.dtype(np.float32): 30.0, np.dtype(np.float64): 300.0}


def _uniform(shape, seed: int, start: int):
    return backend.get_backend("cpu").uniform(shape, seed, start)


@functools.lru_cache(maxsize=16)
def _causal_bias(n: int, dtype):
    """[n, n]: 0 where query i of a block may look at the block's key j, -inf where j > i
    (the triangle where a block of n queries meets its last n keys). Cached: every layer and
    step asks for the same few."""
    return np.where(future_mask(np, n, n), -math.inf, 0.0).astype(dtype)


def heads_last(shape, dtype):
    """An empty [..., H, T, D] array laid out in memory as [..., T, H, D]: the heads' layout
    before attention, so joining them afterwards copies nothing."""
    if len(shape) < 3:
        return np.empty(shape, dtype=dtype)
    *lead, h, t, d = shape
    return np.swapaxes(np.empty((*lead, t, h, d), dtype=dtype), -2, -3)


def attention_query_rows(tk: int) -> int:
    """Queries per block. All of them up to Tk = 128 (smaller products are not worth
    splitting: every NumPy call costs microseconds, whatever its size); from there a quarter
    of the keys (a causal block then skips most of the masked half), at most 128 (measured
    best at T = 1024), and at long contexts at most 128K scores per head (512 KB in float32)."""
    if tk <= 128:
        return max(tk, 1)
    return max(16, min(128, tk // 4, (1 << 17) // tk))


class _AttentionTiles:
    """Where the blocks of one attention call are. q [..., H, Tq, D] against k, v [..., H_kv,
    Tk, *]: the leading axes (flattened: "sequence" u), H_kv kv heads, blocks of queries.
    A forward task takes kv heads j0:j1 (query heads j0 n : j1 n) and queries i0:i1 of one
    sequence, a backward task kv heads j0:j1 with all their queries (it owns their key and
    value gradients). Small problems are one task holding everything."""

    def __init__(self, q_shape, k_shape, causal: bool, dropout_p: float, seed: int):
        self.lead, (self.heads, self.tq), (self.kv_heads, self.tk) = q_shape[:-3], q_shape[-3:-1], k_shape[-3:-1]
        self.group = self.heads // self.kv_heads
        self.causal, self.dropout_p, self.seed = causal, dropout_p, seed
        self.mask_start = backend.mask_start((*self.lead, self.heads, self.tq, self.tk))  # a data-parallel shard's place
        self.whole = math.prod(self.lead) * self.heads * self.tq * self.tk <= SMALL_ATTENTION
        self.index = [(...,)] if self.whole else list(np.ndindex(*self.lead))  # each sequence's place in the leading axes
        rows = self.tq if self.whole else attention_query_rows(self.tk)
        self.blocks = [(i0, min(i0 + rows, self.tq)) for i0 in range(0, self.tq, rows)]

    def stacked(self, a, j0: int, j1: int, i0: int, i1: int, factor=None):
        """Rows i0:i1 of query heads j0 n : j1 n of one sequence's a [..., H, Tq, C], as
        [..., j1 - j0, n (i1 - i0), C]: each kv head's n query heads one above the other.
        A copy (times `factor` when given, in a's dtype), so the reshape is free."""
        block = a[..., j0 * self.group:j1 * self.group, i0:i1, :]
        block = block * factor if factor is not None else block.copy()
        return block.reshape(*block.shape[:-3], j1 - j0, self.group * (i1 - i0), block.shape[-1])

    def unstacked(self, a, i0: int, i1: int):
        """The inverse of stacked for a [..., g, n rows, C] block: [..., g n, rows, C]."""
        return a.reshape(*a.shape[:-3], a.shape[-3] * self.group, i1 - i0, a.shape[-1])

    def keep(self, u: int, j0: int, j1: int, i0: int, i1: int, kend: int):
        """The dropout mask of one task, stacked like its scores, [..., g, n rows, kend], or
        None: each query head's rows i0:i1 of the whole [..., H, Tq, Tk] mask are one run of
        its random stream (all the task's heads one run when the rows are whole heads)."""
        if self.dropout_p == 0.0:
            return None
        per_head, h0, h1 = self.tq * self.tk, j0 * self.group, j1 * self.group
        first = self.mask_start + (0 if self.whole else u * self.heads * per_head) + h0 * per_head + i0 * self.tk
        lead = self.lead if self.whole else ()
        if i1 - i0 == self.tq:
            numbers = _uniform((*lead, h1 - h0, self.tq, self.tk), self.seed, first)
        else:
            numbers = np.stack([_uniform((i1 - i0, self.tk), self.seed, first + h * per_head) for h in range(h1 - h0)])
        keep = numbers[..., :kend] >= self.dropout_p
        return keep.reshape(*keep.shape[:-3], j1 - j0, self.group * (i1 - i0), kend)

    def kept(self, mask, u: int, j0: int, j1: int, i0: int, i1: int, kend: int):
        """keep's mask for the same task, read from the bits the forward kept (attention_forward)."""
        bits = mask[self.index[u]][..., j0 * self.group:j1 * self.group, i0:i1, :-(-kend // 8)]
        keep = np.unpackbits(bits, axis=-1, count=kend).view(bool)  # [..., g n, rows, kend]
        return keep.reshape(*keep.shape[:-3], j1 - j0, self.group * (i1 - i0), kend)

    def _head_ranges(self, per_task: int) -> list[tuple[int, int]]:
        per_task = self.kv_heads if self.whole else max(1, min(self.kv_heads, per_task))
        return [(j0, min(j0 + per_task, self.kv_heads)) for j0 in range(0, self.kv_heads, per_task)]

    def run_query_blocks(self, fn) -> None:
        """fn(u, j0, j1, i0, i1) for every forward task, in runs of consecutive tasks on the
        threads. A task takes as many kv heads as give about TASK_SCORES scores, but no more
        than leave every thread a task (a batch of one sequence still uses every core)."""
        rows = self.blocks[0][1] - self.blocks[0][0]
        per_head = len(self.index) * len(self.blocks)  # tasks per kv head
        head_ranges = -(-num_threads() // per_head)  # at least this many, for a task per thread
        per_task = min(TASK_SCORES // (self.group * rows * self.tk), self.kv_heads // head_ranges)
        tasks = [(u, j0, j1, i0, i1) for u in range(len(self.index)) for j0, j1 in self._head_ranges(per_task)
                 for i0, i1 in self.blocks]
        run_blocks(lambda s: [fn(*t) for t in tasks[s]], len(tasks), max(1, len(tasks) // (4 * num_threads())))

    def run_sequences(self, fn) -> None:
        """fn(u, j0, j1) for every backward task, side by side on the threads: two tasks per
        thread, each as many kv heads of one sequence as that leaves."""
        per_task = len(self.index) * self.kv_heads // (2 * num_threads())
        tasks = [(u, j0, j1) for u in range(len(self.index)) for j0, j1 in self._head_ranges(per_task)]
        run_blocks(lambda s: [fn(*t) for t in tasks[s]], len(tasks), 1)


def _needs_shift(bound, tiles: _AttentionTiles, u: int, j0: int, j1: int, i0: int, i1: int) -> bool:
    """Whether exp(s) might overflow or underflow without subtracting a shift first in this
    task: by Cauchy-Schwarz |s_ij| = |q_i . k_j| <= |q_i| |k_j|, so while every row's bound
    |q_i|^2 max_j |k_j|^2 is below the limit squared, every exp(s) is a normal number and
    softmax(s) = exp(s) / sum exp(s) needs no max."""
    rows = bound[tiles.index[u]][..., j0 * tiles.group:j1 * tiles.group, i0:i1]
    return bool(rows.size and rows.max() >= NO_SHIFT_LIMIT[bound.dtype] ** 2)  # no rows (an empty batch): nothing to shift


def _score_bounds(q, k, scale):
    """|q_i|^2 max_j |k_j|^2 scale^2 for every query, [..., H, Tq]: a bound on the square of
    each of its scores (see _needs_shift); k [..., H_kv, Tk, D] is shared by groups of heads."""
    k_norm_sq = np.einsum("...d,...d->...", k, k).max(axis=-1, keepdims=True)  # [..., H_kv, 1]
    return np.einsum("...d,...d->...", q, q) * np.repeat(k_norm_sq * (scale * scale), q.shape[-3] // k.shape[-3], axis=-2)


def _scores(qs, k, tiles: _AttentionTiles, i0: int, i1: int):
    """(S, kend): S = Q K^T for stacked queries qs [..., g, n rows, D] (already times the score
    scale) against the keys they may see, k[..., :kend, :] of their g kv heads. Causal: query
    i sits at position Tk - Tq + i, so the block sees keys up to Tk - Tq + i1 - 1, and its
    last i1 - i0 keys form a triangle hidden from the queries before them (-inf)."""
    kend = tiles.tk - tiles.tq + i1 if tiles.causal else tiles.tk
    s = qs @ np.swapaxes(k[..., :kend, :], -1, -2)  # [..., g, n rows, D] @ [..., g, D, kend]
    if tiles.causal:
        rows = i1 - i0
        s.reshape(*s.shape[:-2], tiles.group, rows, kend)[..., kend - rows:] += _causal_bias(rows, s.dtype)
    return s, kend


def _keeps_mask(q, tk: int, dropout_p: float) -> bool:
    """Whether the forward keeps its dropout mask for backward, as bits: when they take no more
    memory than q (Tk / 8 bytes a query against D x 4 in float32: up to Tk = 2048 for heads of
    64), so that attention's memory still grows with T; beyond, backward draws the mask again.
    Drawing is most of dropout's cost (about 2 ns a number; unpacking the bits 0.06)."""
    return dropout_p > 0.0 and -(-tk // 8) <= q.shape[-1] * q.itemsize


def attention_forward(q, k, v, causal: bool, dropout_p: float, seed: int):
    """(out, lse, mask): out as functional.ScaledDotProductAttention, k and v with H_kv heads
    (H_kv dividing q's H); lse [..., H, Tq] (float64) the log-sum-exp of each query's scaled
    scores, from which attention_backward rebuilds P; mask the dropout mask as bits
    [..., H, Tq, Tk / 8] (uint8, rows of keys in a query's past), or None (see _keeps_mask)."""
    if q.ndim == 2:  # (T, D) inputs: one head
        out, lse, mask = attention_forward(q[None], k[None], v[None], causal, dropout_p, seed)
        return out[0], lse[0], None if mask is None else mask[0]
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    scale = dtype.type(1.0 / math.sqrt(q.shape[-1]))
    out = heads_last((*q.shape[:-1], v.shape[-1]), dtype)
    lse = np.empty(q.shape[:-1], dtype=np.float64)
    mask = np.zeros((*q.shape[:-1], -(-k.shape[-2] // 8)), np.uint8) if _keeps_mask(q, k.shape[-2], dropout_p) else None
    tiles = _AttentionTiles(q.shape, k.shape, causal, dropout_p, seed)
    bound = _score_bounds(q, k, scale)

    def task(u, j0, j1, i0, i1):
        at, heads = tiles.index[u], slice(j0 * tiles.group, j1 * tiles.group)
        qs = tiles.stacked(q[at], j0, j1, i0, i1, scale)
        p, kend = _scores(qs, k[at][..., j0:j1, :, :], tiles, i0, i1)
        shift = p.max(axis=-1, keepdims=True) if _needs_shift(bound, tiles, u, j0, j1, i0, i1) else None
        if shift is not None:
            p -= shift
        np.exp(p, out=p)  # softmax in place (the scores are not needed afterwards), its division left for the output
        total = p.sum(axis=-1, keepdims=True)
        lse_rows = np.log(total, dtype=np.float64)
        if shift is not None:
            lse_rows += shift
        lse[at][..., heads, i0:i1] = tiles.unstacked(lse_rows, i0, i1)[..., 0]
        keep = tiles.keep(u, j0, j1, i0, i1, kend)
        if keep is not None:
            p *= keep
            if mask is not None:
                bits = np.packbits(tiles.unstacked(keep, i0, i1), axis=-1)  # [..., g n, rows, kend / 8]
                mask[at][..., heads, i0:i1, :bits.shape[-1]] = bits
        o = p @ v[at][..., j0:j1, :kend, :]  # [..., g, n rows, kend] @ [..., g, kend, Dv]
        o /= total
        if keep is not None:
            o *= drop_scale(dropout_p)
        out[at][..., heads, i0:i1, :] = tiles.unstacked(o, i0, i1)

    tiles.run_query_blocks(task)
    return out, lse, mask


def _probabilities(q, k, lse, bound, tiles: _AttentionTiles, u: int, j0: int, j1: int, i0: int, i1: int, scale):
    """(qs, P_c, f, kend) of one backward block: its stacked queries times the score scale,
    P_c = exp(s - c) [..., g, n rows, kend] made in place of the scores, and f = exp(c - L)
    [..., g, n rows, 1] (float64), so that P = P_c f is the forward's softmax. The shift c is 0
    when no score can overflow exp (_needs_shift), else L rounded to s's dtype (s - c is then
    exact for the scores near the top of the row, those that matter, and f puts back what
    the rounding took)."""
    at = tiles.index[u]
    qs = tiles.stacked(q[at], j0, j1, i0, i1, scale)
    p, kend = _scores(qs, k[at][..., j0:j1, :, :], tiles, i0, i1)
    lse_rows = tiles.stacked(lse[at][..., None], j0, j1, i0, i1)  # [..., g, n rows, 1]
    shift = 0.0
    if _needs_shift(bound, tiles, u, j0, j1, i0, i1):
        shift = lse_rows.astype(p.dtype)
        p -= shift
    np.exp(p, out=p)
    return qs, p, np.exp(shift - lse_rows), kend


def attention_backward(grad, q, k, v, out, lse, mask, causal: bool, dropout_p: float, seed: int, needs):
    """(dq, dk, dv), kv heads of one sequence per task (their key and value gradients add up
    over the query blocks and the group's query heads); each block's probabilities rebuilt
    from lse as P = P_c f (_probabilities). The row factor f is not multiplied into the
    [rows, kend] P_c but into the [rows, Dv] gradient and D that P meets, the backward being
    linear in them (g = dL/dout, D = rowsum(dP * P) = g . out, one number per query):
        dV += (P_c f)^T g = P_c^T (f g),   dS = P_c f (dP - D) = P_c ((f g) V^T - f D).
    The dropout mask is read from the forward's bits when it kept them, else drawn again."""
    if q.ndim == 2:
        grads = attention_backward(grad[None], q[None], k[None], v[None], out[None], lse[None],
                                   None if mask is None else mask[None], causal, dropout_p, seed, needs)
        return tuple(None if g is None else g[0] for g in grads)
    need_q, need_k, need_v = needs
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    scale = dtype.type(1.0 / math.sqrt(q.shape[-1]))
    grad_q = heads_last(q.shape, q.dtype) if need_q else None
    grad_k, grad_v = heads_last(k.shape, k.dtype), heads_last(v.shape, v.dtype)
    tiles = _AttentionTiles(q.shape, k.shape, causal, dropout_p, seed)
    bound = _score_bounds(q, k, scale)
    d = np.einsum("...d,...d->...", grad, out)[..., None]  # D: [..., H, Tq, 1]

    def task(u, j0, j1):
        at = tiles.index[u]
        dk, dv = np.zeros(grad_k[at][..., j0:j1, :, :].shape, dtype), np.zeros(grad_v[at][..., j0:j1, :, :].shape, dtype)
        for i0, i1 in tiles.blocks:
            qs, p, factor, kend = _probabilities(q, k, lse, bound, tiles, u, j0, j1, i0, i1, scale)
            keep = tiles.keep(u, j0, j1, i0, i1, kend) if mask is None else tiles.kept(mask, u, j0, j1, i0, i1, kend)
            g = tiles.stacked(grad[at], j0, j1, i0, i1)
            g *= (factor if keep is None else factor * drop_scale(dropout_p)).astype(dtype)  # f g (/ (1 - p))
            dv[..., :kend, :] += np.swapaxes(p if keep is None else p * keep, -1, -2) @ g
            dscores = g @ np.swapaxes(v[at][..., j0:j1, :kend, :], -1, -2)  # f dP, through the dropout mask
            if keep is not None:
                dscores *= keep
            dscores -= (tiles.stacked(d[at], j0, j1, i0, i1) * factor).astype(dtype)
            dscores *= p  # dS, with respect to the scaled scores
            if need_q:
                grad_q[at][..., j0 * tiles.group:j1 * tiles.group, i0:i1, :] = tiles.unstacked(
                    dscores @ k[at][..., j0:j1, :kend, :], i0, i1) * scale
            dk[..., :kend, :] += np.swapaxes(dscores, -1, -2) @ qs  # qs holds the score scale
        grad_k[at][..., j0:j1, :, :], grad_v[at][..., j0:j1, :, :] = dk, dv

    tiles.run_sequences(task)
    return grad_q, grad_k if need_k else None, grad_v if need_v else None
