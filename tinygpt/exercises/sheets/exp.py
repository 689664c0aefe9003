"""Warm-up 5: the backward pass of exp.

Forward:
    out = exp(a)       elementwise

Shapes in the check: a, out and dout [3, 4].

Your task: write backward(dout, cache) returning da, the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
exp is its own derivative: d exp(a)/da = exp(a), which the forward already computed.

Check it with:  tinygpt exercise check exp exp.py
"""
import numpy as np


def forward(a):
    out = np.exp(a)
    cache = (a, out)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4]."""
    a, out = cache
    raise NotImplementedError("write da, then return it")


if __name__ == "__main__":  # `python exp.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("exp", __file__))
