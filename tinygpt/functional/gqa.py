"""Grouped-query attention's one new step: each key/value head shared by a group of query heads.

With H query heads and H_kv key/value heads (H_kv dividing H), query head h reads key/value
head h // (H / H_kv): consecutive query heads form a group around one shared head, as in
Hugging Face's repeat_kv. The cache then holds H_kv heads instead of H, which is the point.
"""
from __future__ import annotations

from tinygpt.backend import backend_of
from tinygpt.tensor import Function, Tensor


class RepeatHeads(Function):
    """y[..., h, :, :] = x[..., h // n, :, :]   for h < n * H_kv: each of the H_kv heads of x
    repeated n times in a row, (..., H_kv, T, D) -> (..., n H_kv, T, D).

    Backward: head j of x feeds outputs j n, ..., j n + n - 1, and a value used n times
    receives the sum of the n gradients (dy_h/dx_j = 1 when h // n = j, else 0):
        dL/dx_j = sum_{r < n} g[j n + r],
    which is g reshaped to (..., H_kv, n, T, D) and summed over the group axis.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-repeat_heads], [DEVICE-gqa_attention]
    test_torch_parity_ops.py::test_every_op_case_matches_torch[DEVICE-gqa_attention-*] (cases in
    tinygpt/opsuite_llama.py) test_llama.py::test_repeat_heads_shares_each_kv_head_with_its_group_and_sums_their_gradients."""

    @staticmethod
    def forward(ctx, x, repeats):
        ctx.repeats = repeats
        return repeat_kv(x, repeats)

    @staticmethod
    def backward(ctx, grad):
        return sum_groups(grad, ctx.repeats)


def repeat_kv(x, n: int):
    """The array step of RepeatHeads: [..., H_kv, T, D] -> [..., n H_kv, T, D], each head n times in a row."""
    return backend_of(x).repeat(x, n, axis=-3) if n > 1 else x


def sum_groups(grad, n: int):
    """Its backward: [..., n H_kv, T, D] -> [..., H_kv, T, D], the n gradients of each group summed."""
    if n == 1:
        return grad
    *lead, heads, t, d = grad.shape
    return grad.reshape(*lead, heads // n, n, t, d).sum(axis=-3)  # sum over each group


def repeat_heads(x: Tensor, repeats: int) -> Tensor:
    """x (..., H_kv, T, D) with each head repeated `repeats` times in a row: (..., H_kv * repeats, T, D)."""
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeat_heads: repeats must be a positive integer, got {repeats!r}")
    if x.ndim < 3:
        raise ValueError(f"repeat_heads: expected x of shape (..., H_kv, T, D), got shape {x.shape}")
    return x if repeats == 1 else RepeatHeads.apply(x, repeats=repeats)
