"""Warm-up 11: the backward pass of indexing with an integer array.

Forward:
    out = a[rows]      a [V, C], rows [N] integers (some repeat) -> out [N, C]

Shapes in the check: a [5, 4], rows = [3, 0, 3], out and dout [3, 4].

Your task: write backward(dout, cache) returning da, the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
Row rows[n] of a is copied to out[n]: it goes back there. A row picked twice gets both
gradients added; a row never picked gets 0.

Check it with:  tinygpt exercise check getitem getitem.py
"""
import numpy as np


def forward(a, rows):
    out = a[rows]  # [5, 4] indexed by [3] -> [3, 4]
    cache = (a, rows)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [5, 4]."""
    a, rows = cache
    raise NotImplementedError("write da, then return it")


if __name__ == "__main__":  # `python getitem.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("getitem", __file__))
