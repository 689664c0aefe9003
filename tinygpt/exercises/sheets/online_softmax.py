"""Exercise: the online softmax, FlashAttention's forward, one block of keys at a time.

Plain attention makes a whole row of scores s_1..s_Tk, then softmax(s) and softmax(s) @ V.
The online softmax sees the keys in blocks and keeps, for each query row, three running
values over the keys seen so far:
    m   the largest score                     starts at -inf
    l   = sum_j exp(s_j - m)                  starts at 0
    a   = sum_j exp(s_j - m) v_j              starts at 0 (a row of Dv values)
A new block of scores s (and its values V_blk) updates them. Write the update: the new
maximum m' = max(m, max_j s_j), then l' and a' from l and a, which were summed against the
old maximum m. Hint: exp(s_j - m') = exp(s_j - m) * exp(m - m'). Every exp then sees an
argument <= 0, so nothing overflows (the check has rows of scores near +700 and -800).
After the last block: out = a / l = softmax(s) @ V, and the row's log-sum-exp
lse = log sum_j exp(s_j) (written with m and l) is what FlashAttention keeps for backward.

Scores of keys in a query's future are -inf (causal: query i sits at position Tk - Tq + i).
exp(-inf - m') is 0, so they add nothing; every row sees key 0, so m is finite after the
first block.

Shapes: s [B, Tq, Tk] (already scaled by 1/sqrt(D)), v [B, Tk, Dv]; m and l [B, Tq, 1],
a [B, Tq, Dv]; out [B, Tq, Dv], lse [B, Tq]. B = 2, Tq = 5, Tk = 11, Dv = 3 in the check,
and BLOCK = 4: blocks of 4, 4 and 3 keys.

Your task: write step(m, l, a, s, v) -> (m, l, a) and finish(m, l, a) -> (out, lse). The
loop is given (run, below); the check runs it with your two functions, so each call of
step sees one block only, and compares out and lse with the plain softmax's.

Check it with:  tinygpt exercise check online_softmax online_softmax.py
"""
import sys

import numpy as np

BLOCK = 4


def step(m, l, a, s, v):
    """One block: m, l [B, Tq, 1], a [B, Tq, Dv], s [B, Tq, bk], v [B, bk, Dv] -> (m', l', a')."""
    raise NotImplementedError("write the update of m, l and a, then return them")


def finish(m, l, a):
    """After the last block: (out [B, Tq, Dv], lse [B, Tq])."""
    raise NotImplementedError("write out and lse, then return them")


def run(functions, s, v):
    """The tiled loop, given: `functions` holds step and finish (this module, or your file)."""
    B, Tq, Tk = s.shape
    m = np.full((B, Tq, 1), -np.inf)
    l = np.zeros((B, Tq, 1))
    a = np.zeros((B, Tq, v.shape[-1]))
    for start in range(0, Tk, BLOCK):
        keys = slice(start, min(start + BLOCK, Tk))
        m, l, a = functions.step(m, l, a, s[..., keys], v[..., keys, :])
    return functions.finish(m, l, a)


def forward(s, v):
    """(out, lse) by your step and finish."""
    return run(sys.modules[__name__], s, v)


if __name__ == "__main__":  # `python online_softmax.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("online_softmax", __file__))
