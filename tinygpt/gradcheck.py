"""Check analytic gradients against finite differences.

For a function f of tensors, compare what backward computes with the central difference
    (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)    for every element i of every input,
where L = sum(f(x) * r) projects the output onto a fixed random tensor r, so one backward
checks the whole Jacobian-vector product and no output element can hide a wrong gradient.
Everything runs in float64: in float32 the difference quotient loses about half its
digits to rounding and a correct gradient would look wrong.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tinygpt import backend
from tinygpt.tensor import Tensor, no_grad


@dataclass
class GradcheckReport:
    passed: bool
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    checked: int = 0  # number of elements compared
    worst: dict = field(default_factory=dict)  # the element furthest outside the tolerance

    def describe(self) -> str:
        if not self.worst:
            return f"gradcheck passed: {self.checked} elements, max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}"
        w = self.worst
        return (f"gradcheck {'passed' if self.passed else 'FAILED'}: {self.checked} elements, max abs error {self.max_abs_error:.3g}, "
                f"max rel error {self.max_rel_error:.3g}; worst: input {w['input']} (shape {w['shape']}) element {w['index']}: "
                f"analytic {w['analytic']:.10g}, numeric {w['numeric']:.10g}")


class GradcheckError(AssertionError):
    pass


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[Tensor], eps: float = 1e-6, atol: float = 1e-5,
              rtol: float = 1e-3, raise_exception: bool = False) -> bool:
    """True when backward agrees with central finite differences on every element of every
    input that requires grad: |analytic - numeric| <= atol + rtol * |numeric|.
    With raise_exception=True a failure raises GradcheckError naming the worst element."""
    report = gradcheck_report(fn, inputs, eps=eps, atol=atol, rtol=rtol)
    if raise_exception and not report.passed:
        raise GradcheckError(report.describe())
    return report.passed


def gradcheck_report(fn: Callable[..., Tensor], inputs: Sequence[Tensor], eps: float = 1e-6, atol: float = 1e-5,
                     rtol: float = 1e-3, seed: int = 0) -> GradcheckReport:
    """Like gradcheck, but returns the errors. `fn(*inputs)` may also use tensors it closes
    over: the inputs are switched to float64 in place (and restored afterwards), so a model
    whose parameters are passed as `inputs` is checked as it is. The library's random
    generators are reseeded before every evaluation, so dropout draws the same mask each
    time, and their state is restored at the end."""
    inputs = list(inputs)
    _check_arguments(fn, inputs, eps, atol, rtol)
    saved = [(t.data, t.grad) for t in inputs]
    dtype, rng_state = backend.default_dtype(), backend.get_rng_state()
    backend.set_default_dtype(np.float64)
    try:
        for t in inputs:
            t.data = t.data.astype(np.float64) if t.dtype.kind == "f" else t.data
            t.grad = None
        with contextlib.ExitStack() as stack:  # no TF32 products, even where a user allowed them
            for device in {t.device for t in inputs}:
                stack.enter_context(backend.get_backend(device).full_precision())
            return _compare(fn, inputs, eps, atol, rtol, seed)
    finally:
        for t, (data, grad) in zip(inputs, saved):
            t.data, t.grad = data, grad
        backend.set_default_dtype(dtype)
        backend.set_rng_state(rng_state)


def _check_arguments(fn, inputs: list, eps: float, atol: float, rtol: float) -> None:
    if not callable(fn):
        raise TypeError(f"gradcheck: fn must be a function of the inputs, got {type(fn).__name__}")
    bad = [type(t).__name__ for t in inputs if not isinstance(t, Tensor)]
    if bad:
        raise TypeError(f"gradcheck: inputs must be Tensors, got {', '.join(bad)}")
    if not (eps > 0 and atol >= 0 and rtol >= 0):  # NaN fails too
        raise ValueError(f"gradcheck: eps must be > 0 and atol, rtol >= 0, got eps={eps}, atol={atol}, rtol={rtol}")


def central_differences(objective: Callable[[], float], array, eps: float = 1e-6) -> np.ndarray:
    """d objective / d array as (f(a + eps) - f(a - eps)) / 2 eps, element by element, with the
    contiguous `array` changed in place and restored (objective reads it). A host array back."""
    grad = np.empty(array.size)
    flat = array.reshape(-1)  # a view
    for i in range(array.size):
        original = flat[i].item()
        flat[i] = original + eps
        plus = objective()
        flat[i] = original - eps
        minus = objective()
        flat[i] = original
        grad[i] = (plus - minus) / (2 * eps)
    return grad.reshape(array.shape)


def _compare(fn, inputs, eps, atol, rtol, seed) -> GradcheckReport:
    backend.manual_seed(seed)
    out = fn(*inputs)
    if not out.requires_grad:
        raise ValueError("gradcheck: the function's output does not require grad; no input reaches it")
    projection = Tensor(backend.to_device(np.random.default_rng(seed).standard_normal(out.shape), out.device))

    def objective() -> float:
        backend.manual_seed(seed)
        return (fn(*inputs).data * projection.data).sum().item()

    (out * projection).sum().backward()
    report = GradcheckReport(passed=True)
    worst_excess = -np.inf
    for position, t in enumerate(inputs):
        if not t.requires_grad:
            continue
        analytic = backend.to_host(t.grad.data).reshape(-1) if t.grad is not None else np.zeros(t.size)
        with no_grad():  # the float64 copy made above is contiguous, as central_differences needs
            numeric = central_differences(objective, t.data, eps).reshape(-1)
        abs_err = np.abs(analytic - numeric)
        scale = np.maximum(np.abs(analytic), np.abs(numeric))
        rel_err = np.where(scale > atol, abs_err / np.maximum(scale, 1e-300), 0.0)
        excess = abs_err - (atol + rtol * np.abs(numeric))
        report.checked += t.size
        if t.size == 0:
            continue
        report.max_abs_error = max(report.max_abs_error, float(abs_err.max()))
        report.max_rel_error = max(report.max_rel_error, float(rel_err.max()))
        i = int(excess.argmax())
        if excess[i] > 0:
            report.passed = False
        if excess[i] > worst_excess:
            worst_excess = excess[i]
            report.worst = {"input": position, "shape": t.shape, "index": tuple(int(j) for j in np.unravel_index(i, t.shape)),
                            "analytic": float(analytic[i]), "numeric": float(numeric[i])}
    return report
