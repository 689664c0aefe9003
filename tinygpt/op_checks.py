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


def axis(op: str, x, axis: int) -> None:
    _require(isinstance(axis, int) and -max(x.ndim, 1) <= axis < max(x.ndim, 1),
             lambda: f"{op}: axis {axis!r} is out of range for an input of shape {x.shape}")


def dropout_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")


def attention(q, k, v, causal: bool, p: float) -> None:
    _require((q.ndim == k.ndim == v.ndim) and q.ndim >= 2 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
             and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2],
             lambda: f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not agree; "
                     "expected (..., Tq, D), (..., Tk, D), (..., Tk, Dv) with equal leading axes")
    _require(not causal or q.shape[-2] <= k.shape[-2],
             lambda: f"attention: causal attention needs at least as many keys ({k.shape[-2]}) as queries ({q.shape[-2]})")
    dropout_p(p)


def cross_entropy(logits, targets, ignore_index: int) -> None:
    """targets: the backend array of integer targets."""
    rows = math.prod(logits.shape[:-1])
    _require(logits.ndim >= 1 and (tuple(targets.shape) == logits.shape[:-1] or tuple(targets.shape) == (rows,)),
             lambda: f"cross_entropy: logits shape {logits.shape} and targets shape {tuple(targets.shape)} do not match "
                     f"(expected targets of shape {logits.shape[:-1]} or ({rows},))")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
    counted = targets[targets != ignore_index]
    if counted.size == 0:
        raise ValueError(f"cross_entropy: every target equals ignore_index ({ignore_index}); "
                         "the mean over no targets is undefined")
    low, high = int(counted.min()), int(counted.max())
    if low < 0 or high >= logits.shape[-1]:
        raise IndexError(f"cross_entropy: target {low if low < 0 else high} is out of range for {logits.shape[-1]} classes")
