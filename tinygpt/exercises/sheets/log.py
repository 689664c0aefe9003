"""Warm-up 6: the backward pass of log.

Forward:
    out = log(a)       elementwise (a > 0)

Shapes in the check: a, out and dout [3, 4].

Your task: write backward(dout, cache) returning da, the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
d log(a)/da = 1/a.

Check it with:  tinygpt exercise check log log.py
"""
import numpy as np


def forward(a):
    out = np.log(a)
    cache = (a,)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4]."""
    (a,) = cache
    raise NotImplementedError("write da, then return it")


if __name__ == "__main__":  # `python log.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("log", __file__))
