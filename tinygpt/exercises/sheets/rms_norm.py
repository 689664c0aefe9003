"""Exercise: the backward pass of RMSNorm (Llama, Qwen, SmolLM2, Mistral).

Forward, for each row x of C values (the last axis):
    ms   = (1/C) sum_i x_i^2                   the mean square (no mean is subtracted)
    rstd = 1 / sqrt(ms + eps)
    xhat = x * rstd
    y    = xhat * weight

LayerNorm without the mean and the shift: the size of a row is all it removes. (Gemma stores
weight - 1 and multiplies by 1 + weight; the derivation is the same with w = 1 + weight.)

Shapes: x, y and dy [B, T, C], weight [C]
with B = 2, T = 3, C = 7 in the check.

Your task: write backward(dy, cache) returning (dx, dweight), the gradients of the loss L
with respect to x and weight, given dy = dL/dy. Careful: x_j reaches xhat_i two ways,
directly (when i = j) and through rstd, which every x_j of the row moves:
    d rstd / d x_j = -(1/2) (ms + eps)^(-3/2) * 2 x_j / C = -rstd^3 x_j / C

Check it with:  tinygpt exercise check rms_norm rms_norm.py
"""
import numpy as np

EPS = 1e-6


def forward(x, weight):
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS)   # [B, T, 1]
    xhat = x * rstd                                                    # [B, T, C]
    y = xhat * weight                                                  # [B, T, C]
    cache = (x, weight, xhat, rstd)
    return y, cache


def backward(dy, cache):
    """dy: dL/dy [B, T, C] -> (dx [B, T, C], dweight [C])."""
    x, weight, xhat, rstd = cache
    raise NotImplementedError("write dx and dweight, then return them")


if __name__ == "__main__":  # `python rms_norm.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("rms_norm", __file__))
