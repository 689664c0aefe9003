"""Exercise: the backward pass of a linear layer.

Forward (W stored as [out, in], like PyTorch and tinygpt):
    y = x W^T + b          y[b, t, o] = sum_i x[b, t, i] W[o, i] + b[o]

Shapes: x [B, T, IN], W [OUT, IN], b [OUT], y and dy [B, T, OUT]
with B = 2, T = 3, IN = 4, OUT = 5 in the check.

Your task: write backward(dy, cache) returning (dx, dW, db), the gradients of the loss L
with respect to x, W and b, given dy = dL/dy. Each has the shape of what it is the
gradient of. Remember that b is added at every (b, t) position.

Check it with:  tinygpt exercise check linear linear.py
"""
import numpy as np


def forward(x, W, b):
    y = x @ W.T + b  # [B, T, IN] @ [IN, OUT] -> [B, T, OUT]
    cache = (x, W, b)
    return y, cache


def backward(dy, cache):
    """dy: dL/dy [B, T, OUT] -> (dx [B, T, IN], dW [OUT, IN], db [OUT])."""
    x, W, b = cache
    raise NotImplementedError("write dx, dW and db, then return them")


if __name__ == "__main__":  # `python linear.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("linear", __file__))
