"""Elementwise activations and the softmax family."""
from __future__ import annotations

import math

from tinygpt import op_checks
from tinygpt.backend import backend_of
from tinygpt.tensor import Function, Tensor


# GPT-2's tanh approximation of GELU, shared by the plain op and every kernel:
# gelu(x) = 0.5 x (1 + tanh(SQRT_2_OVER_PI (x + GELU_CUBIC x^3)))
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


class GELU(Function):
    """y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)   (GPT-2's tanh approximation).

    With t = tanh(u) and dt/du = 1 - t^2:
        dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,   du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    Only x is saved; t is recomputed in backward, which costs one tanh but saves a
    full-size buffer (the 4C-wide feed-forward activation is the largest in the block).
    (x * x * x, not x**3: NumPy computes a power of 3 with the general pow, 40 times slower.)

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-gelu], [DEVICE-mlp_chain]
    test_torch_parity_ops.py::test_gelu_matches_torch_tanh_approximation
    test_kernels.py::test_cpu_kernels_match_the_plain_math_element_by_element[gelu*] (in tests/)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1.0 + backend_of(x).tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        t = backend_of(x).tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x))
        du_dx = SQRT_2_OVER_PI * (1.0 + 3 * GELU_CUBIC * x**2)
        return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx)


def gelu(x: Tensor) -> Tensor:
    return GELU.apply(x)


# ============================================================================ softmax


class Softmax(Function):
    """y_i = exp(x_i) / sum_j exp(x_j)   along `axis`,
    computed as exp(x_i - max) / sum_j exp(x_j - max): the same value, but exp never sees a
    positive argument, so it cannot overflow.

    dy_i/dx_j = y_i (delta_ij - y_j), so dL/dx_j = sum_i g_i y_i (delta_ij - y_j)
              = y_j (g_j - sum_i g_i y_i).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-softmax]
    test_torch_parity_ops.py::test_softmax_and_log_softmax_match_torch (in tests/)."""

    @staticmethod
    def forward(ctx, x, axis):
        y = backend_of(x).exp(x - x.max(axis=axis, keepdims=True))
        y /= y.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return y * (grad - (grad * y).sum(axis=ctx.axis, keepdims=True))


class LogSoftmax(Function):
    """y_i = x_i - log sum_j exp(x_j)   along `axis` (with the max subtracted first, as in softmax).

    dy_i/dx_j = delta_ij - softmax_j, so dL/dx_j = g_j - softmax_j sum_i g_i,
    with softmax = exp(y).

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-log_softmax]
    test_torch_parity_ops.py::test_softmax_and_log_softmax_match_torch (in tests/)."""

    @staticmethod
    def forward(ctx, x, axis):
        xp = backend_of(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad - backend_of(y).exp(y) * grad.sum(axis=ctx.axis, keepdims=True)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    op_checks.axis("softmax", x, axis)
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    op_checks.axis("log_softmax", x, axis)
    return LogSoftmax.apply(x, axis=axis)


# ============================================================================ silu


class SiLU(Function):
    """y = x * s,  s = sigmoid(x) = 1 / (1 + exp(-x))   (also called swish; SwiGLU's gate).

    ds/dx = s (1 - s), so dy/dx = s + x s (1 - s) = s (1 + x (1 - s)).
    s is computed from e = exp(-|x|), which never overflows: s = 1 / (1 + e) for x >= 0,
    e / (1 + e) below (the same value, exp(x) / (1 + exp(x)), with numerator and denominator
    divided by exp(-x)). Only x is saved; s is recomputed in backward.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-silu], [DEVICE-swiglu]
    test_torch_parity_ops.py::test_every_op_case_matches_torch[DEVICE-silu-*] (case in tinygpt/opsuite_llama.py)
    test_llama.py::test_silu_is_finite_with_the_right_limits_at_the_extremes (in tests/)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        s = sigmoid(x)
        return grad * (s * (1.0 + x * (1.0 - s)))


def sigmoid(x):
    """1 / (1 + exp(-x)) of an array, without overflow for either sign of x."""
    xp = backend_of(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0, e) / (1.0 + e)


def silu(x: Tensor) -> Tensor:
    return SiLU.apply(x)


class SwiGLU(Function):
    """y = silu(a) * b = a s b,  s = sigmoid(a)   (a = x W_gate^T, b = x W_up^T: the gated middle
    of Llama's feed-forward, fc3(swiglu(fc1(x), fc2(x)))).

    With silu'(a) = s (1 + a (1 - s)) (see SiLU):
        dL/da = g * b * s (1 + a (1 - s)),   dL/db = g * silu(a).
    One op instead of silu then a product: only a and b are saved, where the pair would also
    keep silu(a) (a hidden_dim-wide array per token), and s is recomputed in backward.

    Tested by: test_ops_gradcheck.py::test_op_grad_matches_finite_differences[DEVICE-swiglu]
    test_torch_parity_ops.py::test_every_op_case_matches_torch[DEVICE-swiglu-*] (case in tinygpt/opsuite_llama.py)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * sigmoid(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        s = sigmoid(a)
        silu_a = a * s
        grad_a = grad * b * (s + silu_a * (1.0 - s)) if ctx.needs_input_grad[0] else None
        return grad_a, grad * silu_a


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise; gate and up have one shape."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {gate.shape} and up shape {up.shape} differ")
    return SwiGLU.apply(gate, up)
