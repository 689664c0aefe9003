"""Rotary position embeddings (RoPE), in Hugging Face's rotate-half layout.

A head vector of size D is read as D/2 pairs (x1_i, x2_i) = (x[i], x[i + D/2]), and pair i
of the vector at position p is rotated by the angle p * f_i, with frequencies
f_i = theta^(-2i / D) (i = 0 .. D/2 - 1) running from one turn per 2 pi positions down to
very slow ones. A query at position p and a key at position q then meet through
R(p f)^T R(q f) = R((q - p) f): their dot product depends only on how far apart they are.
(The original paper pairs neighbours x[2i], x[2i+1]; Llama's checkpoints were permuted to
the rotate-half layout, which is the one every Hugging Face model of this family uses.)

Llama 3.1 and 3.2 stretch the slow frequencies to reach longer contexts (`rope_scaling` with
rope_type "llama3"): with wavelength lambda_i = 2 pi / f_i and L the original context,
    lambda_i < L / high_freq_factor:  f_i unchanged            (fine detail, left alone)
    lambda_i > L / low_freq_factor:   f_i / factor              (slow: interpolated)
    in between:                       (1 - a) f_i / factor + a f_i,
                                      a = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
"""
from __future__ import annotations

import math

from tinygpt import op_checks
from tinygpt.backend import backend_of
from tinygpt.tensor import Function, Tensor

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rotate_half(xp, x):
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: a quarter turn of every pair."""
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Rope(Function):
    """y = x cos(a) + rotate_half(x) sin(a),  a = positions * frequencies (each angle once per
    half, so pair i turns by a_i):
        y1 = x1 cos a - x2 sin a,   y2 = x2 cos a + x1 sin a,
    which is y = R(a) x for the rotation R(a) = [[cos a, -sin a], [sin a, cos a]] of each pair.

    Backward: dL/dx = R(a)^T g, and the transpose of a rotation is the rotation back, R(-a):
        dx1 = g1 cos a + g2 sin a,   dx2 = g2 cos a - g1 sin a,
    i.e. dx = g cos(a) - rotate_half(g) sin(a). The angles take no gradient (positions are ids).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-rope], [DEVICE-qk_norm_rope]
    test_torch_parity_ops.py::test_every_op_case_matches_torch[DEVICE-rope-*] (case in tinygpt/opsuite_llama.py:
    torch's reference is a complex rotation) test_llama.py::test_rope_backward_is_the_inverse_rotation,
    test_llama.py::test_rope_turns_each_pair_by_position_times_frequency (in tests/)."""

    @staticmethod
    def forward(ctx, x, positions, frequencies):
        xp = backend_of(x)
        angles = rope_angles(positions, frequencies, x.dtype)
        angles = xp.concatenate([angles, angles], axis=-1)  # [..., T, D]: pair i turns by angle i in both halves
        cos, sin = xp.cos(angles), xp.sin(angles)
        ctx.save_for_backward(cos, sin)
        return x * cos + rotate_half(xp, x) * sin

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved
        return grad * cos - rotate_half(backend_of(grad), grad) * sin


def rope_angles(positions, frequencies, dtype):
    """The angle of each pair at each position, positions * frequencies: [T] -> [T, D/2], or
    [B, T] -> [B, 1, T, D/2] (one row of positions per sequence, shared by its heads)."""
    angles = positions[..., None].astype(dtype) * frequencies
    return angles[:, None] if angles.ndim == 3 else angles


def rope_frequencies(xp, head_dim: int, theta: float, scaling: dict | None, dtype):
    """f_i = theta^(-2i / head_dim) for i < head_dim / 2, stretched as Llama 3 does when
    scaling is {"rope_type": "llama3", "factor": ..., "low_freq_factor": ...,
    "high_freq_factor": ..., "original_max_position_embeddings": ...}."""
    f = 1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    if not scaling:
        return f
    factor, low, high, context = (scaling[key] for key in LLAMA3_KEYS)
    wavelength = 2 * math.pi / f
    smooth = (context / wavelength - low) / (high - low)
    medium = (1 - smooth) * f / factor + smooth * f
    return xp.where(wavelength < context / high, f, xp.where(wavelength > context / low, f / factor, medium))


def rope(x: Tensor, positions, theta: float = 10000.0, scaling: dict | None = None) -> Tensor:
    """Rotate each head vector of x (B, H, T, D) by its position's angles. positions: integer
    ids (T,), or (B, T) when the rows sit at different positions (left padding); with a KV cache,
    the new tokens' positions start at the cache length. scaling: Llama 3's rope_scaling dict."""
    xp = backend_of(x.data)
    positions = xp.asarray(positions.data if isinstance(positions, Tensor) else positions)
    op_checks.rope(x, positions, theta, scaling)
    frequencies = rope_frequencies(xp, x.shape[-1], theta, scaling, x.dtype)
    return Rope.apply(x, positions=positions, frequencies=frequencies)
