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
