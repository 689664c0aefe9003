"""Exercise: the backward pass of softmax.

Forward, along the last axis (C values per row):
    y_i = exp(x_i) / sum_j exp(x_j)
(computed as exp(x_i - max x) / sum_j exp(x_j - max x): the same value, but no overflow)

Shapes: x, y and dy [B, T, C] with B = 2, T = 3, C = 5 in the check.

Your task: write backward(dy, cache) returning dx, the gradient of the loss L with
respect to x, given dy = dL/dy. Every y_i depends on every x_j of its row.

Check it with:  tinygpt exercise check softmax softmax.py
"""
import numpy as np


def forward(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)  # [B, T, C], each row sums to 1
    cache = (y,)
    return y, cache


def backward(dy, cache):
    """dy: dL/dy [B, T, C] -> dx [B, T, C]."""
    (y,) = cache
    raise NotImplementedError("write dx, then return it")


if __name__ == "__main__":  # `python softmax.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("softmax", __file__))
