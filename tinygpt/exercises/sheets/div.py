"""Warm-up 3: the backward pass of divide.

Forward:
    out = a / b        elementwise, a and b [B, C] (b is never 0)

Shapes in the check: a, b, out and dout [3, 4].

Your task: write backward(dout, cache) returning (da, db), the gradient of the loss L
with respect to each input, given dout = dL/dout. Each has the shape of its input.
a / b = a * b^-1: d/da = 1/b, and d/db = -a / b^2 (the power rule on b^-1).

Check it with:  tinygpt exercise check div div.py
"""
import numpy as np


def forward(a, b):
    out = a / b
    cache = (a, b)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout -> da [3, 4], db [3, 4]."""
    a, b = cache
    raise NotImplementedError("write da and db, then return them")


if __name__ == "__main__":  # `python div.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("div", __file__))
