"""Warm-up 8: the backward pass of sum over an axis.

Forward:
    out = a.sum(axis=1)     a [B, C] -> out [B]

Shapes in the check: a [3, 4], out and dout [3].

Your task: write backward(dout, cache) returning da, the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
Every a[i, j] of row i adds to out[i] with weight 1: its gradient is dout[i], copied
along the axis that was summed (a sum's backward is a broadcast).

Check it with:  tinygpt exercise check sum sum.py
"""
import numpy as np


def forward(a):
    out = a.sum(axis=1)  # [3, 4] -> [3]
    cache = (a,)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4]."""
    (a,) = cache
    raise NotImplementedError("write da, then return it")


if __name__ == "__main__":  # `python sum.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("sum", __file__))
