"""The argument checks of the fused ops in functional.py, kept apart so the ops read as math.

Each function is named after the op it guards and raises before anything is computed, with
the op, the argument and the shapes or values in the message:
    ValueError: linear: bias shape (3,) does not match weight shape (4, 3) (expected (4,))
Ids and targets are checked on every backend, because CuPy's indexing wraps a bad one silently.
"""
from __future__ import annotations

import math


def _require(condition: bool, message) -> None:
    """ValueError(message()) unless condition: the message is a function, formatted only when
    the check fails (these checks run at every op call)."""
    if not condition:
        raise ValueError(message())


def linear(x, weight, bias) -> None:
    _require(weight.ndim == 2, lambda: f"linear: weight must be 2-D (out_features, in_features), got shape {weight.shape}")
    _require(x.ndim >= 1 and x.shape[-1] == weight.shape[1],
             lambda: f"linear: input shape {x.shape} does not match weight shape {weight.shape} "
                     f"(in_features {weight.shape[1]})")
    _require(weight.shape[1] > 0, lambda: f"linear: weight shape {weight.shape} has no input features; "
                                          "a linear layer needs in_features >= 1")
    _require(bias is None or bias.shape == weight.shape[:1],
             lambda: f"linear: bias shape {bias.shape} does not match weight shape {weight.shape} "
                     f"(expected ({weight.shape[0]},))")


def embedding(ids, weight) -> None:
    """ids: the backend array of integer ids."""
    _require(weight.ndim == 2, lambda: f"embedding: weight must be 2-D (vocab, dim), got shape {weight.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    vocab = weight.shape[0]
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise IndexError(f"embedding: id {low if low < 0 else high} is out of range for a vocabulary of {vocab} "
                             f"(valid ids are 0..{vocab - 1})")


def layer_norm(x, scale, shift, eps: float) -> None:
    _require(x.ndim >= 1, lambda: f"layer_norm: input must have a channel axis, got shape {x.shape}")
    for name, param in (("scale", scale), ("shift", shift)):
        _require(param.shape == x.shape[-1:], lambda: f"layer_norm: {name} shape {param.shape} does not match input shape "
                                                      f"{x.shape} (expected ({x.shape[-1]},))")
    _require(eps > 0, lambda: f"layer_norm: eps must be > 0, got {eps}")
    _require(x.shape[-1] > 0, lambda: f"layer_norm: input shape {x.shape} has no channels; the mean and variance "
                                      "over none are undefined")


def rms_norm(x, weight, eps: float) -> None:
    _require(x.ndim >= 1, lambda: f"rms_norm: input must have a channel axis, got shape {x.shape}")
    _require(weight.shape == x.shape[-1:], lambda: f"rms_norm: weight shape {weight.shape} does not match input shape "
                                                   f"{x.shape} (expected ({x.shape[-1]},))")
    _require(eps > 0, lambda: f"rms_norm: eps must be > 0, got {eps}")
    _require(x.shape[-1] > 0, lambda: f"rms_norm: input shape {x.shape} has no channels; the mean square over none "
                                      "is undefined")


def rope(x, positions, theta: float, scaling) -> None:
    """positions: the backend array of integer positions, (T,) or (B, T)."""
    _require(x.ndim >= 2 and x.shape[-1] % 2 == 0,
             lambda: f"rope: expected x of shape (..., T, D) with an even head size D, got shape {x.shape}")
    if positions.dtype.kind not in "iu":
        raise TypeError(f"rope: positions must be integers, got dtype {positions.dtype}")
    t = x.shape[-2]
    _require(positions.shape == (t,) or (x.ndim == 4 and positions.shape == (x.shape[0], t)),
             lambda: f"rope: positions shape {tuple(positions.shape)} does not fit x of shape {x.shape} "
                     f"(expected ({t},) or (batch, {t}))")
    _require(theta > 0, lambda: f"rope: theta must be > 0, got {theta}")
    if scaling is not None:
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        _require(isinstance(scaling, dict) and scaling.get("rope_type") == "llama3" and all(k in scaling for k in keys),
                 lambda: f"rope: scaling must be a dict with rope_type 'llama3' and {', '.join(keys)}, got {scaling!r}")
        _require(scaling["factor"] > 0 and scaling["high_freq_factor"] > scaling["low_freq_factor"] > 0
                 and scaling["original_max_position_embeddings"] > 0,
                 lambda: f"rope: llama3 scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 and "
                         f"original_max_position_embeddings > 0, got {scaling!r}")


def axis(op: str, x, axis: int) -> None:
    """A normalization (softmax) over `axis`: in range, and not of length 0."""
    _require(isinstance(axis, int) and -max(x.ndim, 1) <= axis < max(x.ndim, 1),
             lambda: f"{op}: axis {axis!r} is out of range for an input of shape {x.shape}")
    _require(x.ndim == 0 or x.shape[axis] > 0,
             lambda: f"{op}: axis {axis} of the input (shape {x.shape}) has length 0; there is nothing to normalize over")


def variance(shape: tuple[int, ...], axis, count: int, ddof: int) -> None:
    """A variance divides by count - ddof: it needs more than ddof values."""
    _require(count - ddof > 0, lambda: f"var with ddof={ddof} of {count} value(s) (shape {shape}, axis {axis}): it needs "
                                       f"more than ddof values")


def not_none_given(op: str, tensors) -> None:
    _require(len(tensors) > 0, lambda: f"{op} needs at least one tensor, got none")


def piece_size(op: str, size: int) -> None:
    _require(size >= 1, lambda: f"{op}: a piece size must be >= 1, got {size}")


def shape(op: str, shape: tuple) -> None:
    """A new tensor's shape: integers >= 0 (NumPy's messages name neither the op nor the shape)."""
    _require(all(isinstance(n, int) or hasattr(n, "__index__") for n in shape) and all(n >= 0 for n in shape),
             lambda: f"{op}: a shape is integers >= 0, got {shape}")


def tensors(op: str, inputs, tensor_type) -> None:
    """An op's inputs are Tensors (or None): a NumPy array must be wrapped first."""
    others = [type(t).__name__ for t in inputs if t is not None and not isinstance(t, tensor_type)]
    if others:
        raise TypeError(f"{op}: expected Tensors, got {', '.join(others)}; wrap arrays with tg.tensor(...)")


def operand(other) -> None:
    """The other side of x + other, x * other, ...: NumPy would turn None into NaN and a text into an error
    about floats."""
    if other is None or isinstance(other, (str, bytes)):
        raise TypeError(f"cannot combine a Tensor with {type(other).__name__} {other!r}; expected a number, array or Tensor")


def reduction(op: str, shape: tuple[int, ...], axis) -> None:
    """A mean or max over `axis` (None: all) covers at least one element: over none it is undefined."""
    axes = range(len(shape)) if axis is None else (axis,) if isinstance(axis, int) else axis
    _require(all(shape[a] > 0 for a in axes),
             lambda: f"{op} over {'all elements' if axis is None else f'axis {axis}'} of an input of shape {shape}: "
                     "there are no elements to take it over")


def dropout_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")


def attention(q, k, v, causal: bool, p: float) -> None:
    """k and v may have fewer heads than q (grouped-query attention): (..., H_kv, Tk, D) with
    H_kv dividing q's H."""
    _require((q.ndim == k.ndim == v.ndim) and q.ndim >= 2 and q.shape[:-3] == k.shape[:-3] == v.shape[:-3]
             and k.shape[:-2] == v.shape[:-2] and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]
             and (q.ndim == 2 or q.shape[-3] % max(k.shape[-3], 1) == 0 and k.shape[-3] > 0),
             lambda: f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not agree; "
                     "expected (..., H, Tq, D), (..., H_kv, Tk, D), (..., H_kv, Tk, Dv) with equal leading axes "
                     "and H_kv dividing H")
    _require(not causal or q.shape[-2] <= k.shape[-2],
             lambda: f"attention: causal attention needs at least as many keys ({k.shape[-2]}) as queries ({q.shape[-2]})")
    _require(k.shape[-2] > 0, lambda: f"attention: k {k.shape} holds no positions; each query needs at least one key")
    _require(q.shape[-1] > 0, lambda: f"attention: q {q.shape} has head size 0")
    dropout_p(p)


def cross_entropy(logits, targets, ignore_index: int) -> None:
    """targets: the backend array of integer targets."""
    rows = math.prod(logits.shape[:-1])
    _require(logits.ndim >= 1 and (tuple(targets.shape) == logits.shape[:-1] or tuple(targets.shape) == (rows,)),
             lambda: f"cross_entropy: logits shape {logits.shape} and targets shape {tuple(targets.shape)} do not match "
                     f"(expected targets of shape {logits.shape[:-1]} or ({rows},))")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
    _require(targets.size > 0, lambda: f"cross_entropy: no targets (logits shape {logits.shape}); "
                                       "the mean over no targets is undefined")
    _require(logits.shape[-1] > 0, lambda: f"cross_entropy: logits shape {logits.shape} has no classes")
    counted = targets[targets != ignore_index]
    if counted.size == 0:
        raise ValueError(f"cross_entropy: every target equals ignore_index ({ignore_index}); "
                         "the mean over no targets is undefined")
    low, high = int(counted.min()), int(counted.max())
    if low < 0 or high >= logits.shape[-1]:
        raise IndexError(f"cross_entropy: target {low if low < 0 else high} is out of range for {logits.shape[-1]} classes")
