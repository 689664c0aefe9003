"""Fast versions of the fused ops of functional.py, and the one place that picks which runs.

functional.py writes every op as plain whole-array math. That is the reference: what a
learner reads and steps through, and what runs on the strict backend. The code here computes
the same numbers faster, and tests/test_kernels.py checks each of them element by element
against the plain op:

    fused.py  the fast ops, under the names of functional's op classes (LayerNorm, GELU, ...),
              each a subclass of the plain op with the same forward(ctx, ...) and
              backward(ctx, grad), computed by the array functions of the device's module:
    cpu.py    NumPy, blocked: rows split into cache-sized blocks on a thread pool, BLAS held
              to one thread while they run, matrix products split across the threads
              (threads.py holds that machinery).
    cuda.py   CuPy: one fused CUDA kernel per op direction instead of a chain of launches.

cpu.py and cuda.py have these functions (arrays in and out, no Tensors):

    matmul(a, b)                                   2-D product
    embedding_backward(ids, grad_rows, vocab)      scatter-add of [N, C] rows into [vocab, C]
    layer_norm_forward(x2, scale, shift, eps)      -> y, xhat, rstd          (x2: [N, C])
    layer_norm_backward(g2, xhat, rstd, scale)     -> dx, dscale, dshift
    gelu_forward(x), gelu_backward(x, grad)
    dropout(x, p, seed)                            x * keep / (1 - p), the mask of backend.uniform
    attention_forward(q, k, v, causal, dropout_p, seed)            -> out, probs
    attention_backward(grad, q, k, v, probs, dropout_p, seed, needs) -> dq, dk, dv
    logsumexp_rows(z)                              [N, V] -> [N]
    cross_entropy_backward(z, lse, t, weight)      (softmax(z) - onehot(t)) * weight
    adamw_step_(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction)

`implementation(op, x)` is the choice: the fast version of op for the device of array x, or
op itself on the strict backend, or when the fast paths are switched off with
TINYGPT_KERNELS=plain or set_kernels("plain") (so a learner can step through the reference
math in a debugger on a real GPT run, and a benchmark can show what each kernel buys).
Function.apply asks it for every op; optim.AdamW asks it for its update.
"""
from __future__ import annotations

import functools
import math
import os

from tinygpt import backend

# GPT-2's tanh approximation of GELU, shared by the plain op and every kernel:
# gelu(x) = 0.5 x (1 + tanh(SQRT_2_OVER_PI (x + GELU_CUBIC x^3)))
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715

INTERFACE = ("matmul", "embedding_backward", "layer_norm_forward", "layer_norm_backward", "gelu_forward", "gelu_backward",
             "dropout", "attention_forward", "attention_backward", "logsumexp_rows", "cross_entropy_backward", "adamw_step_")

MODES = ("fast", "plain")
_mode: str | None = None


def _checked(mode, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    return mode


def set_kernels(mode: str) -> None:
    """"fast": the fused ops use the kernels of their device; "plain": every op runs its plain
    reference math (the default comes from $TINYGPT_KERNELS, else "fast")."""
    global _mode
    _mode = _checked(mode, "kernels")


def kernels_mode() -> str:
    global _mode
    if _mode is None:
        _mode = _checked(os.environ.get("TINYGPT_KERNELS", "fast"), "TINYGPT_KERNELS")
    return _mode


def implementation(op, x):
    """What runs op (an op class of functional.py, or optim.adamw_step_) on array x: its fast
    version of the same name for x's device, or op itself."""
    if (_mode or kernels_mode()) == "plain" or op.__name__ not in FAST_OPS:
        return op
    if backend.device_of(x) not in ("cpu", "cuda"):  # the strict backend: how tests prove the plain math runs on CuPy
        return op
    from tinygpt.kernels import fused  # imported on first use: it imports functional, which imports tensor

    return getattr(fused, op.__name__)


FAST_OPS = frozenset({"Linear", "Embedding", "LayerNorm", "GELU", "Dropout", "ScaledDotProductAttention",
                      "CrossEntropy", "adamw_step_"})  # the names fused.py defines


@functools.cache
def module_of(device: str):
    """kernels.cpu or kernels.cuda, imported on first use (CuPy only when a GPU is asked for)."""
    if device == "cpu":
        from tinygpt.kernels import cpu

        return cpu
    from tinygpt.kernels import cuda

    return cuda
