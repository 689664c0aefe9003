"""Exercise: the backward pass of GELU (GPT-2's tanh approximation).

Forward, element by element:
    u = sqrt(2/pi) (x + 0.044715 x^3)
    y = 0.5 x (1 + tanh(u))

Shapes: x, y and dy [B, T, C] with B = 2, T = 3, C = 5 in the check.

Your task: write backward(dy, cache) returning dx, the gradient of the loss L with
respect to x, given dy = dL/dy. Useful: d tanh(u) / du = 1 - tanh(u)^2.

Check it with:  tinygpt exercise check gelu gelu.py
"""
import numpy as np


def forward(x):
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
    y = 0.5 * x * (1 + np.tanh(u))
    cache = (x,)
    return y, cache


def backward(dy, cache):
    """dy: dL/dy [B, T, C] -> dx [B, T, C]."""
    (x,) = cache
    raise NotImplementedError("write dx, then return it")


if __name__ == "__main__":  # `python gelu.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("gelu", __file__))
