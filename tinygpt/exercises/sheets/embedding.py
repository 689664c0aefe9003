"""Exercise: the backward pass of an embedding lookup.

Forward: each position picks one row of the table W,
    y[b, t, :] = W[ids[b, t], :]

Shapes: ids [B, T] integers in 0..V-1, W [V, C], y and dy [B, T, C]
with B = 2, T = 3, V = 7, C = 5 in the check. Some ids appear more than once, and some
rows of W are not used at all.

Your task: write backward(dy, cache) returning dW, the gradient of the loss L with
respect to W, given dy = dL/dy. (ids are integers: they get no gradient.)

Check it with:  tinygpt exercise check embedding embedding.py
"""
import numpy as np


def forward(W, ids):
    y = W[ids]  # [V, C] indexed by [B, T] -> [B, T, C]
    cache = (W, ids)
    return y, cache


def backward(dy, cache):
    """dy: dL/dy [B, T, C] -> dW [V, C]."""
    W, ids = cache
    raise NotImplementedError("write dW, then return it")


if __name__ == "__main__":  # `python embedding.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("embedding", __file__))
