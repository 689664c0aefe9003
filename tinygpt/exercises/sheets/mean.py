"""Warm-up 9: the backward pass of mean over an axis.

Forward:
    out = a.mean(axis=0)    a [B, C] -> out [C]

Shapes in the check: a [3, 4], out and dout [4].

Your task: write backward(dout, cache) returning da, the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
A mean is a sum divided by the number of terms it averages.

Check it with:  tinygpt exercise check mean mean.py
"""
import numpy as np


def forward(a):
    out = a.mean(axis=0)  # [3, 4] -> [4]
    cache = (a,)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4]."""
    (a,) = cache
    raise NotImplementedError("write da, then return it")


if __name__ == "__main__":  # `python mean.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("mean", __file__))
