"""Exercise: FlashAttention's backward, tile by tile, from the saved log-sum-exp.

Forward (causal attention where the Tq queries are the last of the Tk positions: query i
sits at position Tk - Tq + i and sees the keys j <= Tk - Tq + i):
    S = Q K^T / sqrt(D),   S = -inf at future keys
    P = softmax(S),   out = P V,   L = log sum_j exp(S_j)   (one number per query row)
The forward here is the plain one (online_softmax computes the same out and L block by
block). What it keeps for backward is q, k, v, out and L: not P, whose [B, H, Tq, Tk]
numbers are what a long context cannot afford.

Backward, tile by tile: queries in blocks i of BLOCK rows, keys in blocks j of BLOCK
columns. In each tile, rebuild P exactly from L, P_ij = exp(S_ij - L_i), then go back
through out = P V, P = softmax(S) and S = Q K^T / sqrt(D) as in the attention exercise,
adding each tile's share into dq (its query block) and into dk and dv (its key block).

The catch is the softmax backward, dS = P * (dP - rowsum(dP * P)): its row sum runs over
all Tk keys, which no tile holds. Find it before the loop: sum_j dP_ij P_ij with
dP_ij = g_i . v_j is g_i . (sum_j P_ij v_j), and that sum is a row of something saved.

A tile wholly in the future of its queries (every P there is 0) may be skipped.

Shapes: q, out and dout [B, H, Tq, D]; k, v [B, H, Tk, D]; L [B, H, Tq]
with B = 2, H = 3, Tq = 29, Tk = 38, D = 5 and BLOCK = 4 in the check.

Your task: write backward(dout, cache) returning (dq, dk, dv), never holding an array of
[B, H, Tq, Tk] scores: the check measures the most memory your backward holds at once.

Check it with:  tinygpt exercise check flash_backward flash_backward.py
"""
import numpy as np

BLOCK = 4


def blocks(n):
    """The slices of 0..n-1 in blocks of BLOCK (the last one shorter)."""
    return [slice(start, min(start + BLOCK, n)) for start in range(0, n, BLOCK)]


def future(rows, keys, Tq, Tk):
    """[len(rows), len(keys)] booleans, True where key j is after query i's position Tk - Tq + i."""
    return np.arange(keys.start, keys.stop)[None, :] > np.arange(rows.start, rows.stop)[:, None] + (Tk - Tq)


def forward(q, k, v):
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    S = q @ k.swapaxes(-1, -2) / np.sqrt(D)                             # [B, H, Tq, Tk]
    S = np.where(future(slice(0, Tq), slice(0, Tk), Tq, Tk), -np.inf, S)
    m = S.max(axis=-1, keepdims=True)
    L = (m + np.log(np.exp(S - m).sum(axis=-1, keepdims=True)))[..., 0]  # [B, H, Tq]
    out = np.exp(S - L[..., None]) @ v                                  # [B, H, Tq, D]
    cache = (q, k, v, out, L)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout [B, H, Tq, D] -> (dq [B, H, Tq, D], dk [B, H, Tk, D], dv [B, H, Tk, D])."""
    q, k, v, out, L = cache
    raise NotImplementedError("write dq, dk and dv tile by tile, then return them")


if __name__ == "__main__":  # `python flash_backward.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("flash_backward", __file__))
