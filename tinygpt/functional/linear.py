"""Linear layers and embedding lookups: the two ops that hold most of a GPT's weights."""
from __future__ import annotations

from tinygpt import backend, op_checks
from tinygpt.backend import backend_of
from tinygpt.tensor import Function, Tensor


class Linear(Function):
    """y = x W^T + b, with W stored as (out_features, in_features) like PyTorch.

    Flatten x to rows x_r (N = everything but the last axis): y_r = W x_r + b, so
        dL/dx = dL/dy W              [N, out] @ [out, in] -> [N, in]
        dL/dW = (dL/dy)^T x          [out, N] @ [N, in]   -> [out, in]
        dL/db = sum_r dL/dy_r
    Working on 2-D rows keeps every product one large matrix product.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-linear], [DEVICE-mlp_chain]
    test_torch_parity_ops.py::test_linear_matches_torch
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[linear*] (in tests/)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])  # [..., in] -> [N, in]
        y = x2 @ weight.T  # [N, in] @ [in, out] -> [N, out]
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])  # [N, out] -> [..., out]

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved
        g2 = grad.reshape(-1, grad.shape[-1])  # [..., out] -> [N, out]
        grad_x = (g2 @ weight).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None  # [N, out] @ [out, in]
        grad_w = g2.T @ x2 if ctx.needs_input_grad[1] else None  # [out, N] @ [N, in] -> [out, in]
        grad_b = g2.sum(axis=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b for x (..., in_features), weight (out_features, in_features), bias (out_features,)."""
    op_checks.linear(x, weight, bias)
    return Linear.apply(x, weight, bias)


class Embedding(Function):
    """y[..., :] = W[ids[...], :]   (row lookup).

    Each output row is a copy of one row of W, so dL/dW[v] is the sum of dL/dy over every
    position whose id is v: a scatter-add, which counts repeated ids once per occurrence.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-embedding]
    test_torch_parity_ops.py::test_embedding_matches_torch_with_repeated_ids
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[embedding*] (in tests/)."""

    @staticmethod
    def forward(ctx, weight, ids):
        ctx.ids, ctx.vocab = ids, weight.shape[0]
        return weight[ids]  # [...] -> [..., C]

    @staticmethod
    def backward(ctx, grad):
        ids, g2 = ctx.ids.reshape(-1), grad.reshape(-1, grad.shape[-1])  # [...] -> [N], [..., C] -> [N, C]
        grad_w = backend_of(grad).zeros((ctx.vocab, g2.shape[1]), dtype=g2.dtype)
        backend.index_add(grad_w, ids, g2)  # grad_w[ids[r]] += g2[r] for every row r, repeats included
        return grad_w


def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of `weight` (vocab, C) selected by integer `ids` (array or Tensor, any shape)."""
    ids = backend.to_device(ids.data if isinstance(ids, Tensor) else ids, weight.device)
    op_checks.embedding(ids, weight)
    return Embedding.apply(weight, ids=ids)
