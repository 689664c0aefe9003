"""Warm-up 2: the backward pass of multiply.

Forward:
    out = a * b        elementwise, a and b [B, C]

Shapes in the check: a, b, out and dout [3, 4].

Your task: write backward(dout, cache) returning (da, db), the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
d(a * b)/da = b: each factor's gradient is the upstream gradient times the OTHER factor.

Check it with:  tinygpt exercise check mul mul.py
"""
import numpy as np


def forward(a, b):
    out = a * b
    cache = (a, b)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4], db [3, 4]."""
    a, b = cache
    raise NotImplementedError("write da and db, then return them")


if __name__ == "__main__":  # `python mul.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("mul", __file__))
