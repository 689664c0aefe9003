"""Exercise: the backward pass of layer normalisation.

Forward, for each row x of C values (the last axis):
    mean = (1/C) sum_i x_i
    var  = (1/C) sum_i (x_i - mean)^2          (biased: divide by C, not C - 1)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = xhat * scale + shift

Shapes: x, y and dy [B, T, C], scale and shift [C]
with B = 2, T = 3, C = 5 in the check.

Your task: write backward(dy, cache) returning (dx, dscale, dshift), the gradients of
the loss L with respect to x, scale and shift, given dy = dL/dy. Careful: every x_j
reaches y_i three ways, directly, through mean and through rstd.

Check it with:  tinygpt exercise check layer_norm layer_norm.py
"""
import numpy as np

EPS = 1e-5


def forward(x, scale, shift):
    mean = x.mean(axis=-1, keepdims=True)                    # [B, T, 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)     # [B, T, 1]
    rstd = 1.0 / np.sqrt(var + EPS)                          # [B, T, 1]
    xhat = (x - mean) * rstd                                 # [B, T, C]
    y = xhat * scale + shift                                 # [B, T, C]
    cache = (x, scale, xhat, rstd)
    return y, cache


def backward(dy, cache):
    """dy: dL/dy [B, T, C] -> (dx [B, T, C], dscale [C], dshift [C])."""
    x, scale, xhat, rstd = cache
    raise NotImplementedError("write dx, dscale and dshift, then return them")


if __name__ == "__main__":  # `python layer_norm.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("layer_norm", __file__))
