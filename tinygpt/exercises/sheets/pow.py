"""Warm-up 4: the backward pass of power.

Forward:
    out = a ** 3       elementwise

Shapes in the check: a, out and dout [3, 4].

Your task: write backward(dout, cache) returning da, the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
The power rule: d(a^n)/da = n a^(n-1).

Check it with:  tinygpt exercise check pow pow.py
"""
import numpy as np


P = 3


def forward(a):
    out = a**P
    cache = (a,)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4]."""
    (a,) = cache
    raise NotImplementedError("write da, then return it")


if __name__ == "__main__":  # `python pow.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("pow", __file__))
