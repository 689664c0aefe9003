"""What the autograd engine remembers between calls, kept per thread.

Three things: whether operations record a graph (`no_grad` turns it off), who watches the
graph (`trace()` and `detect_anomaly()` add an observer while they are active), and which
module calls are in progress (hooks.py keeps them, so that every op recorded in a graph knows
its module path, and a trace of a backward whose forward it did not see can still name it).
All are per thread, as PyTorch's grad mode is: inference under `no_grad` in one thread must
not switch gradients off for a training loop in another, and a trace records only its own
thread's nodes.

An observer has on_forward(ctx, inputs, output) (the input Tensors) and on_backward(node, grad_output,
grad_inputs, seconds) (node: the output's GraphNode).
The list is empty by default, so watching costs nothing when nobody watches.
"""
from __future__ import annotations

import contextlib
import functools
import threading


class _ThreadState(threading.local):
    def __init__(self):  # runs once in every thread that touches it
        self.grad_enabled = True
        self.observers: list = []
        self.module_paths: list[str] = []          # the module calls in progress, innermost last
        self.module_names: dict[int, str] = {}     # id(module) -> its path in the outermost module called last
        self.outermost = None                      # a weak reference to that module
        self.parameter_names: dict | None = None   # id(parameter) -> its name there, made when first asked


state = _ThreadState()


@contextlib.contextmanager
def watching(observer):
    """Add observer to this thread's watchers for the with-block (entered once at a time)."""
    if any(o is observer for o in state.observers):
        raise RuntimeError(f"{type(observer).__name__} is already active: enter it once, not nested inside itself")
    state.observers.append(observer)
    try:
        yield observer
    finally:
        state.observers.remove(observer)


class no_grad:
    """Context manager (and decorator) in which operations build no graph."""

    def __enter__(self):
        self._previous, state.grad_enabled = state.grad_enabled, False

    def __exit__(self, *exc):
        state.grad_enabled = self._previous

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)

        return wrapper


def is_grad_enabled() -> bool:
    """Whether operations in this thread record a graph (False inside no_grad)."""
    return state.grad_enabled
