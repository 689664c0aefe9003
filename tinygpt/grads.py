"""Summing gradients in backward: undoing broadcasting, and adding without copying.

The bookkeeping that Tensor.backward leaves to this module, so that its loop reads as the
chain rule and nothing else: summing gradients, calling a node's backward (checking what it
returns, and telling the observers), and the handles of tensor hooks.
"""
from __future__ import annotations

import time
from typing import Any

from tinygpt.backend import backend_of, is_array
from tinygpt.graph_state import state



def unbroadcast(grad, shape: tuple[int, ...]):
    """Undo broadcasting: sum `grad` down to `shape`.

    If y = broadcast(x), each element of x was copied into several elements of y, so
    dL/dx is the sum of dL/dy over those copies: over the leading axes that broadcasting
    added, and over the axes where x had size 1."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    return grad.sum(axis=axes).reshape(shape)


class GradientSums:
    """dL/d(node) for the nodes backward has reached, summed as gradients arrive.

    Summing without copying: a gradient array is *owned* when nothing but this table refers
    to it. Then later gradients are added into it in place, and a leaf may keep it as its
    `.grad`. An array that a Function's backward returns is owned when it is new: not a view
    of another array, not the incoming gradient passed straight through (as Add does), not
    returned twice, and not kept by a graph that lives on (retain_graph). Anything else is
    copied the first time something is added to it."""

    def __init__(self, retain_graph: bool):
        self.retain_graph = retain_graph
        self.sums: dict[int, Any] = {}
        self.owned: dict[int, bool] = {}

    def has(self, node: Any) -> bool:
        return id(node) in self.sums

    def pop(self, node: Any):
        """(the summed gradient of node, whether it is owned), removed from the table."""
        return self.sums.pop(id(node)), self.owned.pop(id(node))

    def add(self, node: Any, grad, fresh: bool) -> None:
        key = id(node)
        if key not in self.sums:
            self.sums[key], self.owned[key] = grad, fresh
        elif self.owned[key]:
            self.sums[key] += grad
        else:
            self.sums[key], self.owned[key] = self.sums[key] + grad, True

    def add_from(self, node: Any, grad, incoming, returned: tuple) -> None:
        """Add `grad`, one of the gradients `returned` by a backward that was given `incoming`,
        to node's sum, broadcasting undone."""
        fresh = (not self.retain_graph and grad is not incoming and getattr(grad, "base", None) is None
                 and sum(r is grad for r in returned) == 1)
        reduced = unbroadcast(grad, node.shape)
        if reduced is not grad:  # unbroadcast summed into a new array
            grad, fresh = reduced, True
        if not is_array(grad):  # NumPy turns 0-d results into scalars; keep arrays of node's dtype
            grad, fresh = backend_of(node.data).asarray(grad, dtype=node.dtype), True
        self.add(node, grad, fresh)


def fits(grad_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether unbroadcast can sum a gradient of grad_shape down to shape."""
    extra = len(grad_shape) - len(shape)
    return extra >= 0 and all(n == 1 or n == m for n, m in zip(shape, grad_shape[extra:]))


def call_backward(node, grad) -> tuple:
    """The backward of the Function that made node, given dL/d(node): one gradient (or None)
    per input, each checked to fit its input's shape (up to broadcasting)."""
    ctx = node._ctx
    started = time.perf_counter() if state.observers else 0.0
    grads = ctx.backward(ctx, grad)
    if not isinstance(grads, tuple):
        grads = (grads,)
    name = type(ctx).__name__
    if len(grads) != len(ctx.inputs):
        raise RuntimeError(f"{name}.backward returned {len(grads)} gradients for {len(ctx.inputs)} inputs")
    for i, (t, g) in enumerate(zip(ctx.inputs, grads)):  # a Python number has no shape: one value
        if t is not None and g is not None and t.requires_grad and not fits(tuple(getattr(g, "shape", ())), t.shape):
            got = f"a gradient of shape {tuple(g.shape)}" if hasattr(g, "shape") else f"a {type(g).__name__}, not an array,"
            raise RuntimeError(f"{name}.backward returned {got} for input {i} of shape {t.shape}")
    for observer in state.observers:
        observer.on_backward(node, grad, grads, time.perf_counter() - started)
    return grads


class HookHandle:
    """What register_hook returns: remove() takes the hook off again."""
    _next_id = 0

    def __init__(self, hooks: dict):
        self._hooks = hooks
        self.id = HookHandle._next_id
        HookHandle._next_id += 1

    def remove(self) -> None:
        self._hooks.pop(self.id, None)
