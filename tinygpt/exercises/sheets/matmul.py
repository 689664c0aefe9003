"""Warm-up 12: the backward pass of matrix product.

Forward:
    out = a @ b        a [N, K], b [K, M] -> out [N, M]

Shapes in the check: a [3, 4], b [4, 5], out and dout [3, 5].

Your task: write backward(dout, cache) returning (da, db), the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
out[n, m] = sum_k a[n, k] b[k, m]. Write the gradient of one element, then see which
matrix product computes all of them; the shapes tell you the order.

Check it with:  tinygpt exercise check matmul matmul.py
"""
import numpy as np


def forward(a, b):
    out = a @ b  # [3, 4] @ [4, 5] -> [3, 5]
    cache = (a, b)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4], db [4, 5]."""
    a, b = cache
    raise NotImplementedError("write da and db, then return them")


if __name__ == "__main__":  # `python matmul.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("matmul", __file__))
