"""Warm-up 10: the backward pass of transpose, then reshape.

Forward:
    out = a.transpose(0, 2, 1).reshape(2, 12)    a [2, 3, 4] -> [2, 4, 3] -> [2, 12]

Shapes in the check: a [2, 3, 4], out and dout [2, 12].

Your task: write backward(dout, cache) returning da, the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
Reshapes and transposes only move numbers around: undo each one, in reverse order.

Check it with:  tinygpt exercise check reshape_transpose reshape_transpose.py
"""
import numpy as np


def forward(a):
    out = a.transpose(0, 2, 1).reshape(2, 12)  # [2, 3, 4] -> [2, 4, 3] -> [2, 12]
    cache = (a,)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [2, 3, 4]."""
    (a,) = cache
    raise NotImplementedError("write da, then return it")


if __name__ == "__main__":  # `python reshape_transpose.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("reshape_transpose", __file__))
