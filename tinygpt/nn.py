"""Layers: the PyTorch-style module system and the GPT's building blocks (book chapters 3-4).

A Module owns Parameters and sub-Modules as plain attributes; `named_parameters()` finds
them by walking the attributes in the order they were set, which gives the state_dict
keys the book uses ("trf_blocks.0.att.W_query.weight", ...).
"""
from __future__ import annotations

import math
import numbers
import weakref
from types import MappingProxyType
from typing import Iterator

from tinygpt import backend, hooks, op_checks
from tinygpt import functional as F
from tinygpt.graph_state import state
from tinygpt.creation import ones, zeros
from tinygpt.tensor import Tensor

_NO_HOOKS = MappingProxyType({})  # read-only: register_*_hook gives a module its own dict
_HOOKED: "weakref.WeakSet[Module]" = weakref.WeakSet()  # every live module that has ever had a hook


def any_hooks() -> bool:
    """Whether any module has a hook now. Only modules that have ever had one are asked, so
    in a process without hooks this costs nothing (kernels/decode.py asks it every token)."""
    return any(m._forward_hooks or m._backward_hooks for m in _HOOKED)


class Parameter(Tensor):
    """A tensor that a Module trains: requires_grad is True unless frozen."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data.data if isinstance(data, Tensor) else data, requires_grad=requires_grad)


def _normal(shape: tuple[int, ...], std: float) -> Parameter:
    b = backend.get_backend(backend.default_device())
    return Parameter(b.randn(shape, backend.default_dtype()) * std)


def uniform_parameter(shape: tuple[int, ...], bound: float) -> Parameter:
    """A Parameter of the default dtype and device, uniform in [-bound, bound)."""
    b = backend.get_backend(backend.default_device())
    return Parameter((b.rand(shape, backend.default_dtype()) * 2.0 - 1.0) * bound)


class Module:
    training = True
    _forward_hooks = _backward_hooks = _NO_HOOKS

    def __call__(self, *args, **kwargs):
        if not (state.grad_enabled or state.observers or self._forward_hooks or self._backward_hooks):
            return self.forward(*args, **kwargs)
        return hooks.call_module(self, args, kwargs)  # module path (for the graph's ops), hooks

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks (PyTorch's semantics)
    def register_forward_hook(self, fn) -> "hooks.HookHandle":
        """Call fn(module, inputs, output) after each forward; a value it returns replaces the
        output. Returns a handle whose remove() takes the hook off."""
        _HOOKED.add(self)
        return hooks.add_hook(self.__dict__.setdefault("_forward_hooks", {}), fn)

    def register_full_backward_hook(self, fn) -> "hooks.HookHandle":
        """Call fn(module, grad_inputs, grad_outputs) in backward, once the gradients with respect
        to the module's positional inputs have arrived (None for inputs that are not tensors or
        need no gradient); a tuple it returns replaces grad_inputs (of a module with several
        inputs that require grad, only the one whose gradient arrived last can be replaced:
        tinygpt's ops have one output each). Returns a handle with remove()."""
        _HOOKED.add(self)
        return hooks.add_hook(self.__dict__.setdefault("_backward_hooks", {}), fn)

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "", remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) pairs; a parameter shared by two modules (weight tying)
        is listed once, under its first name, unless remove_duplicate=False."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and (id(value) not in seen or not remove_duplicate):
                    seen.add(id(value))
                    yield (f"{module_name}.{name}" if module_name else name), value

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; shared (tied) parameters count once."""
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Every parameter by name (tied ones under each of their names), sharing memory."""
        return {name: p.detach() for name, p in self.named_parameters(remove_duplicate=False)}

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Copy arrays or tensors into the parameters by name, onto each parameter's device
        and dtype. Shapes must match; with strict=True the key sets must match too. All
        problems are reported together, and nothing is changed unless there are none."""
        params = dict(self.named_parameters(remove_duplicate=False))
        missing = [k for k in params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in params]
        mismatched = [f"{k}: expected {params[k].shape}, got {tuple(v.shape)}"
                      for k, v in state_dict.items() if k in params and tuple(v.shape) != params[k].shape]
        problems = [f"shape mismatch {m}" for m in mismatched]
        if strict:
            problems += [f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected]
        if problems:
            raise KeyError("load_state_dict: " + "; ".join(problems))
        for name, value in state_dict.items():
            if name in params:
                p = params[name]
                p.data = backend.make_array(value.data if isinstance(value, Tensor) else value, dtype=p.dtype, device=p.device)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "Module":
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, requires_grad: bool = True) -> "Module":
        """Freeze (False) or unfreeze every parameter of this module."""
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def to(self, device: str) -> "Module":
        """Move every parameter (and its gradient) to `device`, in place."""
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = Tensor(backend.to_device(p.grad.data, device))
        return self

    def __repr__(self) -> str:
        children = [f"  ({name}): " + repr(m).replace("\n", "\n  ") for name, m in vars(self).items() if isinstance(m, Module)]
        extra = self.extra_repr()
        if not children:
            return f"{type(self).__name__}({extra})"
        return f"{type(self).__name__}({extra}\n" + "\n".join(children) + "\n)"

    def extra_repr(self) -> str:
        return ""


class Sequential(Module):
    """Modules applied in order; they are named "0", "1", ... as in PyTorch."""

    def __init__(self, *modules: Module):
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i: int) -> Module:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} modules")
        return getattr(self, str(i % n))

    def __len__(self) -> int:
        return sum(1 for v in vars(self).values() if isinstance(v, Module))

    def __iter__(self) -> Iterator[Module]:
        return (v for v in vars(self).values() if isinstance(v, Module))  # "0", "1", ... in the order they were set

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


class ModuleList(Sequential):
    """A list of modules, named "0", "1", ...; unlike Sequential it has no forward."""

    def __init__(self, modules=()):
        super().__init__(*modules)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self)), module)

    def forward(self, x):
        raise TypeError("ModuleList has no forward; iterate over it")


def _check_sizes(layer: str, **sizes) -> None:
    """A layer's sizes are integers >= 1: a mistake is one line naming it, not an error from
    inside the initialisation (a division by zero, NumPy's "negative dimensions")."""
    for name, n in sizes.items():
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{layer}: {name} must be an integer >= 1, got {n!r}")


class Linear(Module):
    """y = x W^T + b with W of shape (out_features, in_features).

    Initialised like PyTorch's nn.Linear: W and b uniform in +-1/sqrt(in_features), which
    keeps the output variance near the input's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        _check_sizes("Linear", in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = uniform_parameter((out_features, in_features), bound)
        self.bias = uniform_parameter((out_features,), bound) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table of `num_embeddings` vectors of size `embedding_dim` (N(0, 1) init, as PyTorch)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        _check_sizes("Embedding", num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _normal((num_embeddings, embedding_dim), 1.0)

    def forward(self, ids) -> Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise each row to mean 0 and (biased) variance 1, then scale and shift (book names)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        self.eps = eps
        self.scale = Parameter(ones(emb_dim))
        self.shift = Parameter(zeros(emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.scale, self.shift, self.eps)

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, eps={self.eps}"


class GELU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class Dropout(Module):
    def __init__(self, p: float):
        op_checks.dropout_p(p)  # at construction, not at the first training step
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MultiHeadAttention(Module):
    """Causal multi-head self-attention (book chapter 3).

    x [B, T, d_in] is projected to queries, keys and values [B, T, d_out], each split into
    num_heads heads of size d_out / num_heads, attended head by head with a causal mask,
    then the heads are joined and mixed by out_proj. Dropout acts on the attention weights."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False):
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.context_length, self.dropout, self.causal = context_length, dropout, True
        self.W_query = Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = Linear(d_out, d_out)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B,T,d_out] -> [B,H,T,D]

    def forward(self, x: Tensor, cache: "LayerCache | None" = None) -> Tensor:
        """With a cache (generation), x holds only the new tokens: their keys and values are
        appended to the cache and their queries attend to everything cached so far."""
        b, t, _ = x.shape
        if t > self.context_length:
            raise ValueError(f"input has {t} tokens but context_length is {self.context_length}")
        q, k, v = self._heads(self.W_query(x)), self._heads(self.W_key(x)), self._heads(self.W_value(x))
        if cache is not None:
            k, v = cache.append(k, v)  # [B,H,t,D] -> [B,H,cached+t,D]
        context = F.scaled_dot_product_attention(q, k, v, causal=self.causal, dropout_p=self.dropout if self.training else 0.0)
        context = context.transpose(1, 2).reshape(b, t, self.d_out)  # [B,H,T,D] -> [B,T,d_out]
        return self.out_proj(context)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, dropout={self.dropout}"


class FeedForward(Module):
    """Linear(d, 4d) -> GELU -> Linear(4d, d), position by position."""

    def __init__(self, cfg: dict):
        d = cfg["emb_dim"]
        self.layers = Sequential(Linear(d, 4 * d), GELU(), Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TransformerBlock(Module):
    """x + drop(att(norm1(x))), then the same with ff and norm2: pre-LayerNorm with shortcuts."""

    def __init__(self, cfg: dict):
        self.att = MultiHeadAttention(d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
                                      dropout=cfg["drop_rate"], num_heads=cfg["n_heads"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        eps = cfg.get("layer_norm_eps", 1e-5)  # GPT-2's; a Hugging Face config may set another
        self.norm1 = LayerNorm(cfg["emb_dim"], eps=eps)
        self.norm2 = LayerNorm(cfg["emb_dim"], eps=eps)
        self.drop_shortcut = Dropout(cfg["drop_rate"])

    def forward(self, x: Tensor, cache: "LayerCache | None" = None) -> Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class LayerCache:
    """One attention layer's keys and values for the tokens seen so far, preallocated for
    max_len tokens so that each generated token costs one small write, not a copy."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device: str, dtype):
        xp = backend.get_backend(device).xp
        self.k = xp.zeros((batch, heads, max_len, head_dim), dtype=dtype)
        self.v = xp.zeros((batch, heads, max_len, head_dim), dtype=dtype)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Tensors of all the keys and values so far [B, H, cached + t, D], the new k and v [B, H, t, D] included."""
        k_all, v_all = self.write(k.data, v.data)
        return Tensor(k_all), Tensor(v_all)

    def write(self, k, v):
        """append() on arrays: one slice assignment each into the preallocated arrays; returns views."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} tokens; appending {k.shape[2]} to {start} would overflow it")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def nbytes(self) -> int:
        """Memory of the preallocated keys and values (all max_len positions)."""
        return self.k.nbytes + self.v.nbytes

    def __repr__(self) -> str:
        batch, heads, max_len, head_dim = self.k.shape
        return (f"LayerCache(batch={batch}, heads={heads}, head_dim={head_dim}, {self.length} of {max_len} tokens, "
                f"{self.k.dtype}, {_size(self.nbytes)})")


class KVCache:
    """A LayerCache per transformer block (inference only: the cached arrays are not in any graph)."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def __repr__(self) -> str:
        return f"KVCache({len(self.layers)} layers, each {self.layers[0]!r}; {_size(self.nbytes)} in all)"


def _size(nbytes: int) -> str:
    """Bytes for people: 3840 -> '3.8 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
