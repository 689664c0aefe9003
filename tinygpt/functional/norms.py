"""Normalisation over the last axis."""
from __future__ import annotations

from tinygpt import op_checks
from tinygpt.backend import backend_of
from tinygpt.tensor import Function, Tensor


class LayerNorm(Function):
    """y = xhat * scale + shift, xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps),
    mean and biased var taken over the last axis (C values per row).

    Backward, per row. The easy ones: dL/dshift = sum_rows g, dL/dscale = sum_rows g * xhat.
    For x, let dxhat = g * scale. xhat_i depends on x_j directly and through mean and rstd:
        d mean / dx_j = 1/C,   d rstd / dx_j = -rstd^3 (x_j - mean) / C = -rstd^2 xhat_j / C
        d xhat_i / dx_j = rstd (delta_ij - 1/C) - rstd xhat_i xhat_j / C
    so  dL/dx_j = sum_i dxhat_i d xhat_i / dx_j
                = rstd * (dxhat_j - mean(dxhat) - xhat_j * mean(dxhat * xhat)).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-layer_norm], [DEVICE-mlp_chain]
    test_torch_parity_ops.py::test_layer_norm_matches_torch
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[layer_norm*] (in tests/)."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        xp = backend_of(x)
        x2 = x.reshape(-1, x.shape[-1])  # [..., C] -> [N, C]
        mean = x2.mean(axis=-1, keepdims=True)  # [N, 1]
        var = ((x2 - mean) ** 2).mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(var + eps)
        xhat = (x2 - mean) * rstd
        y = xhat * scale + shift
        ctx.save_for_backward(xhat, rstd, scale)
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, scale = ctx.saved
        g2 = grad.reshape(xhat.shape)  # [..., C] -> [N, C]
        grad_shift = g2.sum(axis=0)  # [N, C] -> [C]
        grad_scale = (g2 * xhat).sum(axis=0)
        dxhat = g2 * scale
        grad_x = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return grad_x.reshape(ctx.x_shape), grad_scale, grad_shift


def layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise x (..., C) over its last axis, then scale and shift, both (C,)."""
    op_checks.layer_norm(x, scale, shift, eps)
    return LayerNorm.apply(x, scale, shift, eps=eps)


class RMSNorm(Function):
    """y = xhat * w,  xhat = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps) over the last axis
    (C values per row); w = weight, or 1 + weight when `offset` (Gemma stores weight - 1).
    LayerNorm without the mean and the shift: the scale of a row is all it removes.

    Backward, per row. dL/dweight = sum_rows g * xhat (the same with the offset: dw/dweight = 1).
    For x, let dxhat = g * w. xhat_i depends on x_j directly and through rstd:
        d rstd / dx_j = -rstd^3 x_j / C = -rstd^2 xhat_j / C
        d xhat_i / dx_j = rstd delta_ij - x_i rstd^2 xhat_j / C = rstd (delta_ij - xhat_i xhat_j / C)
    so  dL/dx_j = sum_i dxhat_i d xhat_i / dx_j = rstd * (dxhat_j - xhat_j * mean(dxhat * xhat)).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-rms_norm], [DEVICE-qk_norm_rope]
    test_torch_parity_ops.py::test_every_op_case_matches_torch[DEVICE-rms_norm-*] (case in tinygpt/opsuite_llama.py)
    test_llama.py::test_rms_norm_divides_by_the_root_mean_square_then_weights (in tests/)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        xp = backend_of(x)
        x2 = x.reshape(-1, x.shape[-1])  # [..., C] -> [N, C]
        rstd = 1.0 / xp.sqrt((x2 * x2).mean(axis=-1, keepdims=True) + eps)  # [N, 1]
        xhat = x2 * rstd
        w = 1.0 + weight if offset else weight
        ctx.save_for_backward(xhat, rstd, w)
        ctx.x_shape = x.shape
        return (xhat * w).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, w = ctx.saved
        g2 = grad.reshape(xhat.shape)  # [..., C] -> [N, C]
        grad_weight = (g2 * xhat).sum(axis=0)  # [N, C] -> [C]
        dxhat = g2 * w
        grad_x = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return grad_x.reshape(ctx.x_shape), grad_weight


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, offset: bool = False) -> Tensor:
    """Divide x (..., C) by the root mean square of its last axis, then multiply by weight (C,)
    (by 1 + weight with offset=True)."""
    op_checks.rms_norm(x, weight, eps)
    return RMSNorm.apply(x, weight, eps=eps, offset=bool(offset))
