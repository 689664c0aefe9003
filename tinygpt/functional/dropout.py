"""Dropout, whose mask is drawn again in backward instead of being kept."""
from __future__ import annotations

from tinygpt import backend, op_checks
from tinygpt.tensor import Function, Tensor


def keep_scaled(x, p: float, seed: int):
    """keep / (1 - p) for an array shaped like x, keep = (uniform >= p) drawn from `seed`:
    the mask is never stored, backward draws it again from the same seed."""
    keep = backend.get_backend(backend.device_of(x)).uniform(x.shape, seed) >= p
    return (keep * drop_scale(p)).astype(x.dtype)


def drop_scale(p: float) -> float:
    """1 / (1 - p), what the kept elements are multiplied by so that the expected value of
    each element is unchanged; 0 when everything is dropped (p = 1)."""
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


class Dropout(Function):
    """y = x * keep / (1 - p),  keep ~ Bernoulli(1 - p) per element.   dL/dx = g * keep / (1 - p).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-dropout-P]
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[dropout*] (in tests/)."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return x * keep_scaled(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return grad * keep_scaled(grad, ctx.p, ctx.seed)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); identity when
    not training or p == 0."""
    op_checks.dropout_p(p)
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p, seed=backend.get_backend(x.device).random_seed())
