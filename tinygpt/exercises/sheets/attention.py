"""Exercise: the backward pass of causal scaled dot-product attention.

Forward, for each batch element and head:
    S   = Q K^T / sqrt(D)                  scores: query i against key j
    S[i, j] = -inf where j > i             causal: no query looks at a later key
    P   = softmax(S) along the key axis    each row of P sums to 1
    out = P V

Shapes: q, k, v, out and dout [B, H, T, D]; S and P [B, H, T, T]
with B = 2, H = 3, T = 5, D = 7 in the check.

Your task: write backward(dout, cache) returning (dq, dk, dv), the gradients of the
loss L with respect to q, k and v, given dout = dL/dout. Go back one line at a time:
dP and dv from out = P V, then dS from the softmax, then dq and dk from S. The masked
entries have P = 0, so no gradient flows through them.

Check it with:  tinygpt exercise check attention attention.py
"""
import numpy as np


def forward(q, k, v):
    D, T = q.shape[-1], q.shape[-2]
    S = q @ k.swapaxes(-1, -2) / np.sqrt(D)                 # [B, H, T, D] @ [B, H, D, T] -> [B, H, T, T]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)       # True above the diagonal
    S = np.where(future, -np.inf, S)
    e = np.exp(S - S.max(axis=-1, keepdims=True))
    P = e / e.sum(axis=-1, keepdims=True)                    # [B, H, T, T]
    out = P @ v                                              # [B, H, T, T] @ [B, H, T, D] -> [B, H, T, D]
    cache = (q, k, v, P)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout [B, H, T, D] -> (dq, dk, dv), each [B, H, T, D]."""
    q, k, v, P = cache
    raise NotImplementedError("write dq, dk and dv, then return them")


if __name__ == "__main__":  # `python attention.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("attention", __file__))
