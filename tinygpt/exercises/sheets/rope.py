"""Exercise: the backward pass of rotary position embeddings (RoPE), Hugging Face's layout.

A head vector of D values is read as D/2 pairs (x1_i, x2_i) = (x[i], x[i + D/2]), and pair i
of the vector at position p turns by the angle a = p * f_i, f_i = THETA^(-2i / D):
    y1 = x1 cos a - x2 sin a
    y2 = x2 cos a + x1 sin a
that is y = R(a) x with R(a) = [[cos a, -sin a], [sin a, cos a]] for each pair, or in one line
    y = x cos + rotate_half(x) sin,   rotate_half(x) = (-x2, x1)
with cos and sin repeated over both halves ([T, D]). A query at position p and a key at q
then meet through R(p f)^T R(q f) = R((q - p) f): only their distance counts.

The positions here do not start at 0: these are the T new tokens after a KV cache of
START tokens, at positions START, ..., START + T - 1. (Llama 3's rope_scaling only changes
the frequencies f_i; the backward does not change.)

Shapes: x, y and dy [B, H, T, D]; positions [T]; cos and sin [T, D]
with B = 2, H = 3, T = 5, D = 8 in the check.

Your task: write backward(dy, cache) returning dx, the gradient of the loss L with
respect to x, given dy = dL/dy. y is linear in x: dx = R(a)^T dy, and the transpose of a
rotation is the rotation back, R(-a). Write it with cos, sin and rotate_half. The
positions are integers: they get no gradient.

Check it with:  tinygpt exercise check rope rope.py
"""
import numpy as np

THETA = 100.0  # real models use 10000 (Llama 2) or 500000 (Llama 3); 100 turns every pair visibly here


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: a quarter turn of every pair."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def cos_sin(positions, D):
    """cos and sin [T, D] of the angles positions * f_i, each angle in both halves."""
    frequencies = THETA ** (-np.arange(0, D, 2) / D)                 # [D/2]
    angles = positions[:, None] * frequencies                         # [T, D/2]
    angles = np.concatenate([angles, angles], axis=-1)                # [T, D]: pair i turns by angle i
    return np.cos(angles), np.sin(angles)


def forward(x, positions):
    cos, sin = cos_sin(positions, x.shape[-1])
    y = x * cos + rotate_half(x) * sin                                # [B, H, T, D]
    cache = (positions, cos, sin)
    return y, cache


def backward(dy, cache):
    """dy: dL/dy [B, H, T, D] -> dx [B, H, T, D]."""
    positions, cos, sin = cache
    raise NotImplementedError("write dx, then return it")


if __name__ == "__main__":  # `python rope.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("rope", __file__))
