"""Summing gradients in backward: undoing broadcasting, and adding without copying.

The bookkeeping that Tensor.backward leaves to this module, so that its loop reads as the
chain rule and nothing else: the order of the nodes, summing gradients, calling a node's
backward (checking what it returns, and telling the observers), and the handles of tensor hooks.
"""
from __future__ import annotations

import time
import weakref
from typing import Any

from tinygpt.backend import backend_of, is_array
from tinygpt.graph_state import state


class GraphNode:
    """A tensor's place in the graph: everything backward needs of it except its data.

    An op keeps the nodes of its inputs (`ctx.inputs`), not the input tensors. So when the
    user's code lets go of a tensor (a model drops its residual sums and projections as soon
    as the next line has used them), its array is freed at once, as in PyTorch, unless an op
    saved that array for its backward (then the op holds the array, not the tensor). Were the
    tensors kept instead, every intermediate of the forward would live until backward: about
    a third of the arrays of a Llama block that no backward reads.

    A tensor that requires grad gets its node when an op first consumes it (a leaf) or when
    it is made (an op's output). The node shares the tensor's hooks, and reaches the tensor
    itself only through a weak reference: its .grad receives the gradient if it is a leaf or
    asked retain_grad(), and if it still exists (if nobody holds it, nobody can read .grad)."""

    __slots__ = ("ctx", "shape", "dtype", "xp", "hooks", "tensor", "keeps_grad", "freed", "__weakref__")

    def __init__(self, t, ctx):
        self.ctx = ctx                          # the Function that made the tensor; None for a leaf
        self.shape, self.dtype = t.shape, t.dtype
        self.xp = backend_of(t.data)            # NumPy, CuPy or strict: for gradients that come back as scalars
        self.hooks = t._hooks                   # the same dict as the tensor's: register_hook adds to both
        self.tensor = weakref.ref(t)
        self.keeps_grad = ctx is None           # a leaf; a non-leaf after retain_grad()
        self.freed = False                      # backward ran through it and dropped what its op saved



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


def reverse_topological_order(output) -> list:
    """The nodes of output's graph, from output back to the leaves, each after all its consumers
    (so its gradient is complete when backward reaches it).

    The nodes are GraphNodes (see above). An iterative depth-first search, so graphs deeper
    than Python's recursion limit work."""
    order, visited = [], set()
    stack = [(output, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        if node.freed and node is not output:
            raise RuntimeError("backward through a part of the graph that an earlier backward freed; use retain_graph=True in that earlier call")
        visited.add(id(node))
        stack.append((node, True))
        if node.ctx is not None:
            stack.extend((t, False) for t in node.ctx.inputs if t is not None and id(t) not in visited)
    return order[::-1]


class GradientSums:
    """dL/d(node) for the nodes backward has reached, summed as gradients arrive.

    The bookkeeping here only saves copies; the numbers are those of the plain rule "every
    gradient arriving at a node is added to its sum". An array is *ours* when nothing but this
    table refers to it: then the next gradient for the same node is added into it in place,
    and a leaf may keep it as its `.grad` without a copy. Anything else is copied the first
    time something is added to it, or when a leaf keeps it.

    Example, for w in y = x @ w: MatMul's backward returns a new array for dL/dw, which
    nothing else holds, so w.grad becomes that array itself. Without the bookkeeping it would
    be copied once per step: for GPT-2 124M, 500 MB of copying in every backward.

    What a backward returns is ours when it is new: not a view of another array, not the
    gradient it was given passed straight through (as Add does) unless that one was ours,
    not returned for two inputs, and not from a graph that lives on (retain_graph)."""

    def __init__(self, output, seed, retain_graph: bool):
        self.retain_graph = retain_graph
        self.sums: dict[int, Any] = {id(output): seed}  # id(node) -> dL/d(node) so far
        self.ours: set[int] = {id(output)}  # the ids of the nodes whose sum only this table refers to
        self.given, self.given_is_ours = None, False  # the last gradient handed out by pop

    def __contains__(self, node: Any) -> bool:
        return id(node) in self.sums

    def pop(self, node: Any):
        """The summed dL/d(node), removed from the table."""
        self.given, self.given_is_ours = self.sums.pop(id(node)), id(node) in self.ours
        self.ours.discard(id(node))
        return self.given

    def keepable(self, grad):
        """grad as an array a leaf may keep as its .grad: itself if it was ours, else a copy."""
        if grad is self.given and self.given_is_ours:
            self.given_is_ours = False  # the leaf holds it now
            return grad
        return grad.copy()

    def add_inputs(self, inputs, returned: tuple) -> None:
        """Add each input's gradient, as returned by the backward of the node popped last."""
        for node, grad in zip(inputs, returned):
            if node is not None and grad is not None:
                self._add(node, grad, ours=self._is_new(grad, returned))

    def _is_new(self, grad, returned: tuple) -> bool:
        if self.retain_graph or sum(r is grad for r in returned) > 1:
            return False
        if grad is self.given:
            return self.given_is_ours
        return getattr(grad, "base", None) is None

    def _add(self, node: Any, grad, ours: bool) -> None:
        reduced = unbroadcast(grad, node.shape)
        if reduced is not grad:  # unbroadcast summed into a new array
            grad, ours = reduced, True
        if not is_array(grad):  # NumPy turns 0-d results into scalars; keep arrays of node's dtype
            grad, ours = node.xp.asarray(grad, dtype=node.dtype), True
        key = id(node)
        if key not in self.sums:
            self.sums[key] = grad
            if ours:
                self.ours.add(key)
        elif key in self.ours:
            self.sums[key] += grad
        else:  # the first sum for this node: a new array, ours from now on
            self.sums[key] = self.sums[key] + grad
            self.ours.add(key)


def fits(grad_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether unbroadcast can sum a gradient of grad_shape down to shape."""
    extra = len(grad_shape) - len(shape)
    return extra >= 0 and all(n == 1 or n == m for n, m in zip(shape, grad_shape[extra:]))


def call_backward(node, grad) -> tuple:
    """The backward of the Function that made node, given dL/d(node): one gradient (or None)
    per input, each checked to fit its input's shape (up to broadcasting)."""
    ctx = node.ctx
    started = time.perf_counter() if state.observers else 0.0
    grads = ctx.backward(ctx, grad)
    if not isinstance(grads, tuple):
        grads = (grads,)
    name = type(ctx).__name__
    if len(grads) != len(ctx.inputs):
        raise RuntimeError(f"{name}.backward returned {len(grads)} gradients for {len(ctx.inputs)} inputs")
    for i, (t, g) in enumerate(zip(ctx.inputs, grads)):  # a Python number has no shape: one value
        if t is not None and g is not None and not fits(tuple(getattr(g, "shape", ())), t.shape):
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
