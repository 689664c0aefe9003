"""Watching the graph: `trace()` records the backward pass node by node, `detect_anomaly()`
finds the op where the first inf or NaN was born.

Both are observers of the engine (`tensor.observers`): `Function.apply` tells them about
every op after its forward, the backward loop about every node after its backward, and
`Module.__call__` about every module output. Nobody is in the list unless one of these
context managers is active, so an unwatched model pays nothing.

    with tg.trace() as t:
        loss = F.cross_entropy(model(x), y)   # forward inside too: module paths, forward statistics
        loss.backward()
    print(t.table())                          # per module; t.table(flat=True) node by node
    t.nodes[0].op, t.nodes[0].grad_norm       # one record per backward node, in the order they ran

Module paths ("trf_blocks.3.att") and source lines are taken at forward time, so ops made
before the block was entered show module None.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import weakref
from dataclasses import asdict, dataclass, field

from tinygpt import backend, hooks
from tinygpt.backend import backend_of, is_array
from tinygpt.graph_state import state
from tinygpt.tensor import Tensor

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Files that run an op rather than ask for one: the line that *called* an op is outside them.
_ENGINE = {os.path.join(_PACKAGE, f) for f in ("tensor.py", "grads.py", "ops.py", "functional.py", "hooks.py",
                                                   "trace.py", "anomaly.py")}
_KERNELS = os.path.join(_PACKAGE, "kernels") + os.sep
GELU_TAIL = 3.0  # |x| beyond this: GELU is flat (slope within 1% of 0 or 1), little gradient gets through


@dataclass
class Origin:
    """Where an op was created: its module path, the line that called it (may be inside
    tinygpt, e.g. nn.py in Linear.forward) and the first line of the user's own code."""
    module: str | None
    op_line: str | None
    user_line: str | None


@dataclass
class Node:
    """One backward node: the op that made a tensor, and the gradient that arrived at it."""
    index: int                  # position in the order backward ran the nodes
    op: str                     # the Function's class name
    module: str | None          # module path at forward time; "" the outermost module, None outside any
    shape: tuple                # output shape
    dtype: str
    input_shapes: list          # per input of the op (None for an absent one)
    inputs: list                # per input: the index of its node, "leaf:N" (t.leaves[N]) or None (no gradient)
    grad_norm: float            # of dL/d(output), after tensor hooks
    grad_min: float
    grad_max: float
    grad_zeros: float           # fraction of exact zeros
    saved_bytes: int            # arrays the op kept for its backward
    seconds: float              # its backward's time
    op_line: str | None = None
    user_line: str | None = None


@dataclass
class Leaf:
    """A tensor without an op (a parameter or data) that received a gradient."""
    index: int
    name: str | None            # the parameter's name in the outermost module, when it is one
    shape: tuple


@dataclass
class ModuleStats:
    """Forward statistics of one module, averaged over its calls while tracing."""
    module: str
    kind: str
    calls: int = 0
    out_mean: float = 0.0
    out_std: float = 0.0
    gelu_tail: float | None = None           # share of GELU inputs with |x| > GELU_TAIL
    attention_entropy: list | None = None    # per head, nats, mean over batch and queries
    _sums: dict = field(default_factory=dict, repr=False)

    def add(self, key: str, value) -> None:
        total, n = self._sums.get(key, (None, 0))
        total = value if total is None else [a + b for a, b in zip(total, value)] if isinstance(value, list) else total + value
        self._sums[key] = (total, n + 1)
        mean = [v / (n + 1) for v in total] if isinstance(total, list) else total / (n + 1)
        setattr(self, key, mean)


class Trace:
    """The records of one `with trace():` block: `nodes`, `leaves` and `modules` (forward stats)."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.leaves: list[Leaf] = []
        self.modules: dict[str, ModuleStats] = {}
        self._node_of: dict[int, tuple] = {}     # id(tensor) -> (weakref, node index)
        self._leaf_of: dict[int, tuple] = {}     # id(tensor) -> (weakref, leaf index)
        self._waiting: dict[int, tuple] = {}     # id(tensor) -> (weakref, [(consumer, input position)])

    def __enter__(self) -> "Trace":
        state.observers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        state.observers.remove(self)

    # ------------------------------------------------------------------ observer
    def on_forward(self, ctx, out: Tensor) -> None:
        origin = label(ctx)
        name = type(ctx).__name__
        if name == "GELU":
            (x,) = ctx.saved
            tail = (abs(x) > GELU_TAIL).mean()
            self._stats(origin.module, name).add("gelu_tail", float(tail.item()))
        elif name == "ScaledDotProductAttention":
            probs = ctx.saved[3]  # [B, H, Tq, Tk]
            xp = backend_of(probs)
            entropy = -(probs * xp.log(xp.maximum(probs, 1e-30))).sum(axis=-1)  # [B, H, Tq]
            per_head = backend.to_host(entropy.mean(axis=(0, 2))).tolist()
            self._stats(origin.module, "MultiHeadAttention").add("attention_entropy", per_head)

    def on_module(self, path: str, module, output) -> None:
        if isinstance(output, Tensor) and output.dtype.kind == "f" and output.size:
            stats = self._stats(path, type(module).__name__)
            stats.kind = type(module).__name__
            stats.calls += 1
            stats.add("out_mean", float(output.data.mean().item()))
            stats.add("out_std", float(output.data.std().item()))

    def on_backward(self, node: Tensor, grad_output, grad_inputs: tuple, seconds: float) -> None:
        ctx, index = node._ctx, len(self.nodes)
        origin = label(ctx)
        norm, low, high, zeros = grad_stats(grad_output)
        inputs = [self._input(t, index, i) for i, t in enumerate(ctx.inputs)]
        self.nodes.append(Node(index, type(ctx).__name__, origin.module, node.shape, str(node.dtype),
                               [None if t is None else t.shape for t in ctx.inputs], inputs, norm, low, high, zeros,
                               saved_bytes(ctx), seconds, origin.op_line, origin.user_line))
        self._node_of[id(node)] = (weakref.ref(node), index)
        ref, consumers = self._waiting.pop(id(node), (None, ()))
        if ref is not None and ref() is node:
            for consumer, position in consumers:
                self.nodes[consumer].inputs[position] = index

    def _input(self, t: Tensor | None, consumer: int, position: int):
        """How input `position` of node `consumer` is recorded; a node is filled in when it runs."""
        if t is None or not t.requires_grad:
            return None
        if t.is_leaf:
            ref, leaf = self._leaf_of.get(id(t), (None, None))
            if ref is None or ref() is not t:
                leaf = len(self.leaves)
                self.leaves.append(Leaf(leaf, hooks.parameter_name(t), t.shape))
                self._leaf_of[id(t)] = (weakref.ref(t), leaf)
            return f"leaf:{leaf}"
        ref, consumers = self._waiting.get(id(t), (None, None))
        if ref is None or ref() is not t:
            consumers = []
            self._waiting[id(t)] = (weakref.ref(t), consumers)
        consumers.append((consumer, position))
        return None

    def _stats(self, module: str | None, kind: str) -> ModuleStats:
        key = "(outside modules)" if module is None else module
        if key not in self.modules:
            self.modules[key] = ModuleStats(key, kind)
        return self.modules[key]

    # ------------------------------------------------------------------ reading
    def record(self, t: Tensor) -> Node | None:
        """The record of the node that made tensor t, if backward ran it while tracing."""
        ref, index = self._node_of.get(id(t), (None, None))
        return self.nodes[index] if ref is not None and ref() is t else None

    def table(self, flat: bool = False, module: str | None = None) -> str:
        """The trace as text: one line per module with totals (or per node, flat=True), then
        the forward statistics. `module` keeps only that module and those below it."""
        from tinygpt.trace_views import table

        return table(self, flat=flat, under=module)

    def to_dict(self) -> dict:
        return {"nodes": [asdict(n) for n in self.nodes], "leaves": [asdict(leaf) for leaf in self.leaves],
                "modules": [{k: v for k, v in asdict(m).items() if not k.startswith("_")} for m in self.modules.values()]}

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=1, default=_json_default, allow_nan=True)

    def to_dot(self) -> str:
        """Graphviz DOT text of the traced graph: ops with shapes and gradient norms, leaves as ellipses."""
        from tinygpt.trace_views import to_dot

        return to_dot(self)

    def render(self, path: str, format: str = "svg") -> str:
        """Draw the graph to path.<format> with the graphviz package and `dot` (pip install tinygpt[graph])."""
        try:
            import graphviz
        except ImportError:
            raise RuntimeError("drawing the graph needs the graphviz package and Graphviz's `dot`: "
                               "pip install 'tinygpt[graph]' and e.g. apt install graphviz; to_dot() works without them") from None
        return graphviz.Source(self.to_dot()).render(outfile=f"{path}.{format}", format=format, cleanup=True)

    def to_html(self) -> str:
        """A self-contained HTML page: modules as folding sections, their nodes inside."""
        from tinygpt.trace_views import to_html

        return to_html(self)


def _json_default(value):
    return list(value) if isinstance(value, tuple) else str(value)


def trace() -> Trace:
    """Record every backward node run inside the `with` block (and forward statistics of the
    ops and modules run inside it)."""
    return Trace()


# ============================================================================ helpers


def label(ctx) -> Origin:
    """ctx's Origin, taken the first time anybody asks (at forward time, while watching)."""
    origin = ctx.__dict__.get("origin")
    if origin is None:
        op_line = user_line = None
        frame = sys._getframe(1)
        while frame is not None and user_line is None:
            path = os.path.abspath(frame.f_code.co_filename)
            if op_line is None and path not in _ENGINE and not path.startswith(_KERNELS):
                op_line = _where(frame, path)
            if not path.startswith(_PACKAGE + os.sep):
                user_line = _where(frame, path)
            frame = frame.f_back
        origin = ctx.origin = Origin(hooks.current_module(), op_line, user_line)
    return origin


def _where(frame, path: str) -> str:
    if path.startswith(_PACKAGE + os.sep):
        shown = os.path.relpath(path, os.path.dirname(_PACKAGE))
    else:
        relative = os.path.relpath(path)
        shown = path if relative.startswith("..") else relative
    return f"{shown}:{frame.f_lineno} in {frame.f_code.co_name}"


def grad_stats(g) -> tuple[float, float, float, float]:
    """(L2 norm, min, max, fraction of zeros) of an array, in float64."""
    if g is None or g.size == 0:
        return 0.0, math.nan, math.nan, 0.0
    g64 = g.astype(backend_of(g).float64)
    return (float((g64 * g64).sum().item()) ** 0.5, float(g64.min().item()), float(g64.max().item()),
            float((g64 == 0).mean().item()))


def saved_bytes(ctx) -> int:
    """Bytes of the arrays an op keeps for its backward (ctx.saved and array attributes)."""
    arrays = [a for a in ctx.saved if is_array(a)] + [v for k, v in vars(ctx).items() if k != "saved" and is_array(v)]
    return sum(int(a.nbytes) for a in arrays)


def input_names(ctx) -> list[str]:
    """The names of an op's inputs, from its forward's signature (x, weight, bias, ...)."""
    params = list(inspect.signature(type(ctx).forward).parameters)[1:]
    return [params[i] if i < len(params) else f"input {i}" for i in range(len(ctx.inputs))]


from tinygpt.anomaly import detect_anomaly  # noqa: E402,F401  (part of this module's interface)
