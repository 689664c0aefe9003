"""Warm-up 7: the backward pass of tanh.

Forward:
    out = tanh(a)      elementwise

Shapes in the check: a, out and dout [3, 4].

Your task: write backward(dout, cache) returning da, the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
d tanh(a)/da = 1 - tanh(a)^2: the forward's output is all you need.

Check it with:  tinygpt exercise check tanh tanh.py
"""
import numpy as np


def forward(a):
    out = np.tanh(a)
    cache = (a, out)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4]."""
    a, out = cache
    raise NotImplementedError("write da, then return it")


if __name__ == "__main__":  # `python tanh.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("tanh", __file__))
