"""Tensor and reverse-mode automatic differentiation.

A Tensor holds an array (`.data`, NumPy or CuPy) and, when it was produced by an
operation on tensors that require gradients, its place in the graph (`._node`, a
GraphNode of grads.py): the `Function` object that made it and, through that Function's
`inputs`, the nodes of the tensors it was made from. `backward()` walks that graph once
in reverse topological order, asks each Function for the gradient of the loss with
respect to its inputs given the gradient with respect to its output (the chain rule, one
node at a time), and adds what arrives at each leaf to `.grad`. The graph holds nodes, not
tensors: a tensor's array lives as long as the tensor (or an op that saved it), not as
long as the graph.

The small ops behind Tensor's operators (add, mul, reshape, ...) are in `ops.py`, each
with its backward rule next to its forward; the big fused ops (layer norm, attention,
cross-entropy, ...) are in the `functional` package, on the same `Function` base.

tensor.py and ops.py import each other, on purpose (the pattern of tinygrad's first
version): the ops are Functions and make Tensors, and Tensor's operators are those ops.
Splitting them apart would put `x + y` one indirection away from the Add it runs, so the
cycle stays, closed by the import of ops at the bottom of this file. It is the only one in
the package.
"""
from __future__ import annotations

from typing import Any, Sequence

from tinygpt import backend, dispatch, op_checks
from tinygpt.backend import backend_of, device_of, is_array
from tinygpt.grads import GradientSums, GraphNode, HookHandle, call_backward, reverse_topological_order
from tinygpt.graph_state import is_grad_enabled, no_grad, state  # noqa: F401 (part of tensor's API)


class Function:
    """One differentiable operation, written as a pair of static methods:

        forward(ctx, *arrays, **options) -> array
        backward(ctx, grad)              -> one gradient (or None) per tensor input

    `ctx` is the Function instance: forward stores on it what backward needs
    (`ctx.save_for_backward(...)`, or plain attributes for small things), and backward
    may skip inputs whose `ctx.needs_input_grad[i]` is False. `ctx.inputs` holds the graph
    nodes of the inputs that need a gradient (None for the others): where backward sends
    each gradient it returns. It holds no input's data; an op that needs an input's array
    in its backward saves that array."""

    def __init__(self, inputs: Sequence["Tensor | None"]):
        self.needs_input_grad = tuple([t is not None and t.requires_grad for t in inputs])
        self.requires_grad = state.grad_enabled and any(self.needs_input_grad)  # will backward run?
        self.inputs = tuple([t._graph_node() if needs and self.requires_grad else None
                             for t, needs in zip(inputs, self.needs_input_grad)])
        self.saved: tuple = ()

    def save_for_backward(self, *arrays) -> None:
        """Keep arrays for backward; under no_grad (or with no input needing a gradient) there
        is no backward, and nothing is kept."""
        if self.requires_grad:
            self.saved = arrays

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: "Tensor | None", **options) -> "Tensor":
        """Run forward on the inputs' arrays; link the result into the graph if needed."""
        try:
            arrays = [None if t is None else t._data for t in inputs]
        except AttributeError:  # an input that is no Tensor (an ndarray): say so, not why it broke
            op_checks.tensors(cls.__name__, inputs, Tensor)
            raise
        first = next(a for a in arrays if a is not None)
        if any(type(a) is not type(first) for a in arrays if a is not None):  # the array type tells the device
            devices = {device_of(a) for a in arrays if a is not None}
            if len(devices) > 1:
                raise RuntimeError(f"{cls.__name__}: expected all tensors on one device, got {' and '.join(sorted(devices))}")
        op = dispatch.implementation(cls, first)  # cls itself, or its fast version (kernels/fused.py)
        ctx = op(inputs)
        data = op.forward(ctx, *arrays, **options)
        if not is_array(data):  # NumPy reductions return scalars; keep a 0-d array of the same dtype
            data = backend_of(first).asarray(data)
        out = Tensor(data, requires_grad=ctx.requires_grad)
        if ctx.requires_grad:
            out._node = GraphNode(out, ctx)
            # the module the op sits in (hooks.py keeps the calls), for trace() and detect_anomaly()
            ctx.module_path = state.module_paths[-1] if state.module_paths else None
        for observer in state.observers:
            observer.on_forward(ctx, inputs, out)
        return out


class Tensor:
    """An n-dimensional array that can record the operations applied to it."""

    def __init__(self, data: Any, requires_grad: bool = False):
        if not is_array(data):
            data = backend.make_array(data)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        self._data = data
        self._version = 0  # how many times .data was assigned (w.data += 1 assigns): anomaly mode compares it
        self.requires_grad = requires_grad
        self.grad: Tensor | None = None
        self._node: GraphNode | None = None  # its place in the graph: set by the op that made it, or when first used
        self._hooks: dict[int, Any] = {}

    def __getstate__(self) -> dict:
        """What copy.deepcopy and pickle keep: the data, requires_grad, .grad and hooks, but no
        place in a graph (a copy is a leaf, as a copied model's parameters must be)."""
        return {**self.__dict__, "_node": None}

    # ------------------------------------------------------------------ properties
    @property
    def data(self):
        """The backend array (numpy.ndarray or cupy.ndarray)."""
        return self._data

    @data.setter
    def data(self, array) -> None:
        self._data = array
        self._version += 1
        if self._node is not None and self._node.ctx is None and not self._node.freed:
            self._node = None  # a leaf: its next graph gets a node of the new shape (one made before keeps the old)
        for observer in state.observers:  # anomaly mode notes the line, to name it if a saved tensor changed
            if hasattr(observer, "on_data_assigned"):
                observer.on_data_assigned(self)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self) -> str:
        return device_of(self.data)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def _ctx(self) -> Function | None:
        """The Function that made this tensor (None for a leaf, and after backward freed it)."""
        return None if self._node is None else self._node.ctx

    def _graph_node(self) -> GraphNode:
        """This tensor's node in the graph; a leaf gets one the first time an op consumes it."""
        if self._node is None:
            self._node = GraphNode(self, None)
        return self._node

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        body = repr(self.numpy()).removeprefix("array(").removesuffix(")").replace("\n      ", "\n       ")
        grad = ", requires_grad=True" if self.requires_grad else ""
        device = "" if self.device == "cpu" else f", device='{self.device}'"
        return f"tensor({body}{device}{grad})"

    # ------------------------------------------------------------------ host, device, graph
    def numpy(self):
        """A NumPy copy of the data, on the host."""
        return backend.to_host(self.data)

    def item(self) -> float | int | bool:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}")
        return self.data.item()

    def tolist(self) -> list:
        return self.numpy().tolist()

    def to(self, device_or_dtype) -> "Tensor":
        """A copy on another device ("cpu", "cuda", "strict") or with another dtype."""
        if device_or_dtype in backend.DEVICES:
            return self if device_or_dtype == self.device else ToDevice.apply(self, device=device_or_dtype)
        dtype = backend.as_dtype(device_or_dtype)
        return self if dtype == self.dtype else Cast.apply(self, dtype=dtype)

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def retain_grad(self) -> "Tensor":
        """Keep `.grad` on this non-leaf tensor after backward (for inspection)."""
        if self.requires_grad:
            self._graph_node().keeps_grad = True
        return self

    # ------------------------------------------------------------------ backward
    def backward(self, grad: "Tensor | Any | None" = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * grad into `.grad` of every leaf that requires grad.

        `grad` is dL/d(self); it defaults to 1 for a one-element tensor. The graph is
        freed as it is walked, so a second backward needs `retain_graph=True` the first time."""
        if self._node is not None and self._node.freed:
            raise RuntimeError("backward through a graph that has already been freed: call backward(retain_graph=True) the first time to walk it twice")
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input of its graph has requires_grad=True)")
        xp = backend_of(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element output, this one has shape {self.shape}; pass grad=")
            seed = xp.ones_like(self.data)
        else:
            seed = backend.make_array(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype, device=self.device)
            if seed.shape != self.data.shape:
                raise ValueError(f"backward(): gradient shape {tuple(seed.shape)} does not match tensor shape {self.shape}")

        root = self._graph_node()
        grads = GradientSums(root, seed, retain_graph)  # dL/d(node), summed; dL/d(self) = seed
        for node in reverse_topological_order(root):  # 1. each node after all its consumers
            if node not in grads:
                continue  # no gradient reaches it
            g = _run_hooks(node.hooks, grads.pop(node))  # 2. dL/d(node), complete: hooks may replace it
            if node.keeps_grad:
                _keep_grad(node, grads.keepable(g))  # 3. a leaf adds it to its .grad
            if node.ctx is None:
                continue  # a leaf: no op to go through
            input_grads = call_backward(node, g)  # 4. the chain rule through the node's op
            grads.add_inputs(node.ctx.inputs, input_grads)  # 5. each input's dL/d(input) += its part
            if not retain_graph:  # free what backward saved, as soon as it is used
                node.ctx, node.freed = None, True

    def register_hook(self, fn) -> HookHandle:
        """Call fn(grad) when the gradient of this tensor has been summed, before it is used
        (passed on through the graph, or added to `.grad` of a leaf). fn may return a Tensor
        (or array) to use instead. fn gets a copy of its own: editing it in place (g.data *= 10)
        changes this tensor's gradient from here on, as returning it would, and never another
        tensor's. Returns a handle whose remove() takes the hook off."""
        if not self.requires_grad:
            raise RuntimeError("register_hook on a tensor that does not require grad")
        if not callable(fn):
            raise TypeError(f"register_hook needs a function of the gradient, got {type(fn).__name__}")
        handle = HookHandle(self._hooks)
        self._hooks[handle.id] = fn
        return handle


    # ------------------------------------------------------------------ operators
    def _lift(self, other) -> "Tensor":
        """Python numbers become 0-d tensors of this tensor's dtype; arrays become tensors."""
        if isinstance(other, Tensor):
            return other
        if is_array(other):
            return Tensor(other)
        op_checks.operand(other)
        xp = backend_of(self.data)
        return Tensor(xp.asarray(other, dtype=self.dtype if self.dtype.kind == "f" else None))

    def __add__(self, other): return Add.apply(self, self._lift(other))
    def __radd__(self, other): return Add.apply(self._lift(other), self)
    def __sub__(self, other): return Sub.apply(self, self._lift(other))
    def __rsub__(self, other): return Sub.apply(self._lift(other), self)
    def __mul__(self, other): return Mul.apply(self, self._lift(other))
    def __rmul__(self, other): return Mul.apply(self._lift(other), self)
    def __truediv__(self, other): return Div.apply(self, self._lift(other))
    def __rtruediv__(self, other): return Div.apply(self._lift(other), self)
    def __neg__(self): return Neg.apply(self)
    def __pow__(self, exponent: float): return Pow.apply(self, exponent=exponent)

    def __matmul__(self, other) -> "Tensor":
        other = self._lift(other)
        inner = other.shape[-2] if other.ndim > 1 else other.shape[0] if other.ndim else None
        if self.ndim == 0 or self.shape[-1] != inner:
            raise ValueError(f"matmul: shapes {self.shape} and {other.shape} do not align")
        if self.ndim == 1 and other.ndim == 1:
            return (self * other).sum()
        if self.ndim == 1:  # (K,) @ (..., K, N): treat as a one-row matrix
            return MatMul.apply(self.reshape(1, -1), other).reshape(*other.shape[:-2], other.shape[-1])
        if other.ndim == 1:  # (..., M, K) @ (K,): treat as a one-column matrix
            return MatMul.apply(self, other.reshape(-1, 1)).reshape(*self.shape[:-1])
        return MatMul.apply(self, other)

    def __rmatmul__(self, other): return self._lift(other) @ self

    # comparisons give boolean tensors, outside the graph (they have no useful gradient)
    def __lt__(self, other): return Tensor(self.data < self._lift(other).data)
    def __le__(self, other): return Tensor(self.data <= self._lift(other).data)
    def __gt__(self, other): return Tensor(self.data > self._lift(other).data)
    def __ge__(self, other): return Tensor(self.data >= self._lift(other).data)

    def __getitem__(self, index) -> "Tensor":
        return GetItem.apply(self, index=index_on_device(index, self.device))

    def reshape(self, *shape) -> "Tensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return Reshape.apply(self, shape=shape)

    def transpose(self, axis1: int, axis2: int) -> "Tensor":
        return Transpose.apply(self, axis1=axis1, axis2=axis2)

    def split(self, sizes: int | Sequence[int], axis: int = 0) -> list["Tensor"]:
        """Pieces along `axis`: `sizes` is a piece size (the last may be shorter) or a list of sizes."""
        n = self.shape[axis]
        if isinstance(sizes, int):
            op_checks.piece_size("split", sizes)
            sizes = [min(sizes, n - start) for start in range(0, n, sizes)]
        if sum(sizes) != n:
            raise ValueError(f"split sizes {list(sizes)} add up to {sum(sizes)}, but axis {axis} has size {n}")
        pieces, start = [], 0
        lead = (slice(None),) * (axis % self.ndim)
        for size in sizes:
            pieces.append(self[lead + (slice(start, start + size),)])
            start += size
        return pieces

    def sum(self, axis=None, keepdims: bool = False) -> "Tensor":
        return Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> "Tensor":
        op_checks.reduction("mean", self.shape, axis)
        return self.sum(axis, keepdims) * (1.0 / reduced_count(self.shape, axis))

    def var(self, axis=None, keepdims: bool = False, ddof: int = 0) -> "Tensor":
        """Variance, biased (ddof=0) by default as in NumPy and layer norm."""
        op_checks.variance(self.shape, axis, reduced_count(self.shape, axis), ddof)
        centered = self - self.mean(axis, keepdims=True)
        return (centered * centered).sum(axis, keepdims) * (1.0 / (reduced_count(self.shape, axis) - ddof))

    def max(self, axis=None, keepdims: bool = False) -> "Tensor":
        op_checks.reduction("max", self.shape, axis)
        return Max.apply(self, axis=axis, keepdims=keepdims)

    def exp(self): return Exp.apply(self)
    def log(self): return Log.apply(self)
    def tanh(self): return Tanh.apply(self)
    def sqrt(self): return Sqrt.apply(self)

    def masked_fill(self, mask, value: float) -> "Tensor":
        """`value` where `mask` is True, this tensor elsewhere."""
        return where(mask, value, self)


def _run_hooks(hooks: dict, g):
    """g after a tensor's hooks, in the order they were registered. Each hook gets a copy of
    its own (the engine may share g with a sibling, as Add passes one gradient to both
    inputs): writing into it in place changes the gradient used from here on, as returning a
    new one does, and never another tensor's gradient."""
    for fn in list(hooks.values()):
        mine = Tensor(g.copy())
        result = fn(mine)
        if isinstance(result, Tensor):
            result = result.data
        g = mine.data if result is None else backend.hook_replacement(result, g, fn)
    return g


def _keep_grad(node: GraphNode, g) -> None:
    """Add g to the .grad of node's tensor (a leaf, or one that asked retain_grad), if it still exists."""
    t = node.tensor()
    if t is None:
        return
    if t.grad is None:
        t.grad = Tensor(g)
    else:
        t.grad.data += g


# ====================================================================== joining and choosing (tg.tensor, zeros, ... are in creation.py)

def cat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    op_checks.not_none_given("cat", tensors)
    return Concatenate.apply(*tensors, axis=axis)


def where(cond, a, b) -> Tensor:
    """`a` where `cond` is True, else `b`; a and b are tensors or numbers."""
    if isinstance(cond, Tensor):
        cond = cond.data
    like = a if isinstance(a, Tensor) else b
    cond = backend.to_device(cond, like.device)
    return Where.apply(like._lift(a), like._lift(b), cond=cond)


from tinygpt.ops import (Add, Cast, Concatenate, Div, Exp, GetItem, Log, Max, MatMul, Mul, Neg, Pow,  # noqa: E402
                         Reshape, Sqrt, Sub, Sum, Tanh, ToDevice, Transpose, Where, index_on_device, reduced_count)
