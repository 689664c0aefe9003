"""Watching the graph: `trace()` records the backward pass node by node, `detect_anomaly()`
finds the op where the first inf or NaN was born.

Both are observers of the engine (`graph_state.state.observers`, one list per thread):
`Function.apply` tells them about every op after its forward, the backward loop about every
node after its backward, and `Module.__call__` about every module output. Nobody is in the
list unless one of these context managers is active, so an unwatched model pays nothing.

    with tg.trace() as t:
        loss = F.cross_entropy(model(x), y)   # forward inside too: source lines, forward statistics
        loss.backward()
    print(t.table())                          # per module; t.table(flat=True) node by node
    t.nodes[0].op, t.nodes[0].grad_norm       # one record per backward node, in the order they ran
    t.leaves[0].name, t.leaves[0].grad_norm   # the parameters' gradients when the block ended

    with tg.trace(keep_grads=True) as t:      # also keep the gradient arrays, to compare your own
        loss = F.cross_entropy(model(x), y)   # (makemore's cmp())
        loss.backward()
    t.grad_of("trf_blocks.0.att")             # dL/d(output of that module call), a NumPy array

Module paths ("trf_blocks.3.att") are noted on every op that records a graph, so a trace
that holds only `loss.backward()` names them too; source lines are taken only while someone
watches the forward, so ops made before the trace was entered show none (`Node.forward_seen`
is False), and neither their forward statistics.
A Trace records one `with` block: entering it again, nested or after it ended, is refused.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, field

from tinygpt import backend, hooks
from tinygpt.backend import backend_of
from tinygpt.functional.attention import future_mask
from tinygpt.graph_state import watching
from tinygpt.node_info import origin_of, saved_bytes, take_origin
from tinygpt.tensor import Tensor

GELU_TAIL = 3.0  # |x| beyond this: GELU is flat (slope within 1% of 0 or 1), little gradient gets through


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
    saved_bytes: int            # arrays the op kept for its backward (weights included)
    seconds: float              # its backward's time
    op_line: str | None = None
    user_line: str | None = None
    forward_seen: bool = True   # False: the forward ran before the trace began (source lines unknown)


@dataclass
class Leaf:
    """A tensor without an op (a parameter or data) that received a gradient; its gradient
    statistics are those of `.grad` when the trace ended."""
    index: int
    name: str | None            # the parameter's name in the outermost module, when it is one
    shape: tuple
    grad_norm: float = math.nan
    grad_min: float = math.nan
    grad_max: float = math.nan
    grad_zeros: float = math.nan


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

    def __init__(self, keep_grads: bool = False):
        self.keep_grads = keep_grads
        self.nodes: list[Node] = []
        self.leaves: list[Leaf] = []
        self.modules: dict[str, ModuleStats] = {}
        self.module_outputs: dict[str, list] = {}  # module path -> per call, the node that made its output (or None)
        self._grads: dict = {}                   # node index or leaf name -> gradient array (keep_grads)
        # keyed by id(GraphNode) (see grads.py), each with a weak reference to the node, to tell
        # a node from a later one that got the same id
        self._node_of: dict[int, tuple] = {}     # -> (weakref, node index)
        self._leaf_of: dict[int, tuple] = {}     # a leaf's -> (weakref, leaf index)
        self._waiting: dict[int, tuple] = {}     # -> (weakref, [(consumer, input position)])
        self._outputs: dict[int, tuple] = {}     # a module output's -> (weakref, [(module path, call)])
        self._watch, self._ended = None, False

    def __enter__(self) -> "Trace":
        if self._ended:
            raise RuntimeError("this trace has ended: its records are kept as they are; start a new one with tg.trace()")
        watch = watching(self)
        watch.__enter__()  # refuses a trace that is already active (nested in itself)
        self._watch = watch
        return self

    def __exit__(self, *exc) -> None:
        self._watch.__exit__(*exc)
        self._ended = True
        for ref, index in self._leaf_of.values():
            t = ref() and ref().tensor()
            if t is not None and t.grad is not None:
                leaf = self.leaves[index]
                leaf.grad_norm, leaf.grad_min, leaf.grad_max, leaf.grad_zeros = grad_stats(t.grad.data)
                if self.keep_grads:
                    self._grads[leaf.name or f"leaf:{index}"] = t.grad.data.copy()

    # ------------------------------------------------------------------ observer
    def on_forward(self, ctx, inputs: tuple, out: Tensor) -> None:
        origin = take_origin(ctx)
        ctx.input_shapes = [None if t is None else t.shape for t in inputs]  # the graph keeps only the nodes of some
        name = type(ctx).__name__
        if name == "GELU":
            tail = (abs(inputs[0].data) > GELU_TAIL).mean()
            self._stats(origin.module, name).add("gelu_tail", float(tail.item()))
        elif name == "ScaledDotProductAttention":
            # [B, H, Tq, Tk], from what the op kept, or afresh under no_grad (it keeps nothing then)
            probs = attention_probs(ctx) if len(ctx.saved) >= 4 else _probs_of(inputs[0].data, inputs[1].data, ctx.causal)
            xp = backend_of(probs)
            entropy = -(probs * xp.log(xp.maximum(probs, 1e-30))).sum(axis=-1)  # [B, H, Tq]
            per_head = backend.to_host(entropy.mean(axis=(0, 2))).tolist()
            self._stats(origin.module, "MultiHeadAttention").add("attention_entropy", per_head)

    def on_module(self, path: str, module, output) -> None:
        calls = self.module_outputs.setdefault(path, [])
        calls.append(None)
        if isinstance(output, Tensor) and output.requires_grad:  # its node fills in calls[-1] when backward runs it
            node = output._graph_node()
            ref, waiting = self._outputs.get(id(node), (None, None))
            if ref is None or ref() is not node:
                waiting = []
                self._outputs[id(node)] = (weakref.ref(node), waiting)
            waiting.append((path, len(calls) - 1))
        if isinstance(output, Tensor) and output.dtype.kind == "f" and output.size:
            stats = self._stats(path, type(module).__name__)
            stats.kind = type(module).__name__
            stats.calls += 1
            stats.add("out_mean", float(output.data.mean().item()))
            stats.add("out_std", float(output.data.std().item()))

    def on_backward(self, node, grad_output, grad_inputs: tuple, seconds: float) -> None:
        ctx, index = node.ctx, len(self.nodes)
        origin = origin_of(ctx)  # None: the forward ran before the trace, only its module path was noted
        module, op_line, user_line = ((origin.module, origin.op_line, origin.user_line) if origin
                                      else (getattr(ctx, "module_path", None), None, None))
        norm, low, high, zeros = grad_stats(grad_output)
        inputs = [self._input(t, index, i) for i, t in enumerate(ctx.inputs)]
        self.nodes.append(Node(index, type(ctx).__name__, module, node.shape, str(node.dtype),
                               getattr(ctx, "input_shapes", [None if t is None else t.shape for t in ctx.inputs]),
                               inputs, norm, low, high, zeros,
                               saved_bytes(ctx), seconds, op_line, user_line, origin is not None))
        if self.keep_grads:
            self._grads[index] = grad_output.copy()
        self._node_of[id(node)] = (weakref.ref(node), index)
        ref, consumers = self._waiting.pop(id(node), (None, ()))
        if ref is not None and ref() is node:
            for consumer, position in consumers:
                self.nodes[consumer].inputs[position] = index
        ref, waiting = self._outputs.pop(id(node), (None, ()))
        if ref is not None and ref() is node:
            for path, call in waiting:
                self.module_outputs[path][call] = index

    def _input(self, t, consumer: int, position: int):
        """How input `position` (a GraphNode, or None) of node `consumer` is recorded; a node is
        filled in when it runs."""
        if t is None:
            return None
        if t.ctx is None:  # a leaf
            ref, leaf = self._leaf_of.get(id(t), (None, None))
            if ref is None or ref() is not t:
                leaf = len(self.leaves)
                tensor = t.tensor()
                self.leaves.append(Leaf(leaf, tensor and hooks.parameter_name(tensor), t.shape))
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
        node = t._node
        ref, index = self._node_of.get(id(node), (None, None))
        return self.nodes[index] if ref is not None and ref() is node else None

    def grad_of(self, name: str, call: int | None = None):
        """The gradient kept by trace(keep_grads=True), as a host NumPy array: of the output of
        module `name` ("trf_blocks.0.att"; `call` picks one call of a module called more than
        once), or of parameter `name` ("trf_blocks.0.att.W_query.weight") when the trace ended."""
        if not self.keep_grads:
            raise ValueError("grad_of needs the gradients kept: trace with tg.trace(keep_grads=True)")
        if name in self.module_outputs:
            calls = self.module_outputs[name]
            if call is None and len(calls) > 1:
                raise ValueError(f"module {name!r} was called {len(calls)} times while tracing: "
                                 f"pick one with grad_of({name!r}, call=0 ... {len(calls) - 1})")
            if call is not None and not -len(calls) <= call < len(calls):
                raise ValueError(f"module {name!r} was called {len(calls)} times while tracing, there is no call={call}")
            index = calls[0 if call is None else call]
            if index is None:
                raise ValueError(f"no gradient reached the output of module {name!r} in this trace (it needs no "
                                 "gradient, or backward ran outside the with-block)")
            return backend.to_host(self._grads[index])
        if name in self._grads:
            return backend.to_host(self._grads[name])
        known = list(self.module_outputs) + [leaf.name for leaf in self.leaves if leaf.name]
        hint = ("no module output was seen: run the forward inside the with-block too" if not self.module_outputs
                else f"known: {', '.join(known[:8])}{', ...' if len(known) > 8 else ''}")
        raise ValueError(f"no gradient of {name!r} in this trace ({hint})")

    def table(self, flat: bool = False, module: str | None = None) -> str:
        """The trace as text: one line per module run with totals (or per node, flat=True), the
        parameters' gradients, then the forward statistics. `module` keeps only that module and
        those below it."""
        from tinygpt.trace_views import table

        return table(self, flat=flat, under=module)

    def to_dict(self) -> dict:
        return {"nodes": [asdict(n) for n in self.nodes], "leaves": [asdict(leaf) for leaf in self.leaves],
                "modules": [{k: v for k, v in asdict(m).items() if not k.startswith("_")} for m in self.modules.values()]}

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=1, default=_json_default, allow_nan=True)

    def to_dot(self) -> str:
        """Graphviz DOT text of the traced graph: ops with shapes and gradient norms, leaves
        (parameters) as ellipses with their gradients' statistics."""
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


def trace(keep_grads: bool = False) -> Trace:
    """Record every backward node run inside the `with` block (and forward statistics of the
    ops and modules run inside it). keep_grads=True also keeps each gradient array, for
    `Trace.grad_of`."""
    return Trace(keep_grads)


def attention_probs(ctx):
    """P = softmax(Q K^T / sqrt(D)) of an attention op that ran: the plain op keeps P itself;
    the fast (tiled) one keeps each query's log-sum-exp of the scores instead, and
    P = exp(S - lse) on the keys it may see (0 on future keys when causal)."""
    q, k, _, kept = ctx.saved[:4]
    if kept.ndim == q.ndim:
        return kept
    xp = backend_of(q)
    if q.ndim > 2:  # grouped-query attention: kv head j serves query heads j n ... j n + n - 1
        k = xp.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
    scores = q @ xp.swapaxes(k, -1, -2) * (1.0 / math.sqrt(q.shape[-1]))  # [B,H,Tq,D] @ [B,H,D,Tk]
    probs = xp.exp(scores - kept[..., None])
    return xp.where(future_mask(xp, *probs.shape[-2:]), 0.0, probs) if ctx.causal else probs


def _probs_of(q, k, causal: bool):
    """softmax(Q K^T / sqrt(D)) computed from q and k, future keys hidden when causal."""
    xp = backend_of(q)
    if q.ndim > 2:  # grouped-query attention, as in attention_probs
        k = xp.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
    scores = q @ xp.swapaxes(k, -1, -2) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        scores = xp.where(future_mask(xp, *scores.shape[-2:]), -xp.inf, scores)
    probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)


def grad_stats(g) -> tuple[float, float, float, float]:
    """(L2 norm, min, max, fraction of zeros) of an array, in float64."""
    if g is None or g.size == 0:
        return 0.0, math.nan, math.nan, 0.0
    g64 = g.astype(backend_of(g).float64)
    return (float((g64 * g64).sum().item()) ** 0.5, float(g64.min().item()), float(g64.max().item()),
            float((g64 == 0).mean().item()))


from tinygpt.anomaly import detect_anomaly  # noqa: E402,F401  (part of this module's interface)
