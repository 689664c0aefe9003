"""Warm-up 1: the backward pass of add, with broadcasting.

Forward:
    out = a + b        a [B, C], b [C]: b is added to every row of a (broadcast)

Shapes in the check: a [3, 4], b [4], out and dout [3, 4].

Your task: write backward(dout, cache) returning (da, db), the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
A value that broadcasting used at many positions gets the SUM of the gradients of all
its uses: db has b's shape.

Check it with:  tinygpt exercise check add add.py
"""
import numpy as np


def forward(a, b):
    out = a + b  # [3, 4] + [4] -> [3, 4]
    cache = (a, b)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4], db [4]."""
    a, b = cache
    raise NotImplementedError("write da and db, then return them")


if __name__ == "__main__":  # `python add.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("add", __file__))
