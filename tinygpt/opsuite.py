"""The checks `tinygpt gradcheck` runs: every op on a small input with awkward shapes
(size-1 axes, broadcasting, odd sizes). Each entry builds a function and its inputs on a
device; gradcheck then compares its backward with finite differences."""
from __future__ import annotations

from typing import Callable

import numpy as np

import tinygpt as tg
import tinygpt.functional as F

Case = tuple[str, Callable[..., tg.Tensor], list[tg.Tensor]]


def _make(device: str, seed: int):
    rng = np.random.default_rng(seed)

    def param(*shape, positive: bool = False):
        data = rng.standard_normal(shape)
        return tg.tensor(np.abs(data) + 0.5 if positive else data, requires_grad=True, device=device)

    def ids(high: int, *shape):
        return tg.tensor(rng.integers(0, high, size=shape), device=device)

    return param, ids


def cases(device: str = "cpu", seed: int = 0) -> dict[str, Case]:
    """op name -> (shape description, fn, inputs)."""
    p, ids = _make(device, seed)
    mask = tg.tensor(np.random.default_rng(seed).random((3, 1, 4)) > 0.5, device=device)
    tokens, targets = ids(10, 2, 3), ids(7, 6)
    targets.data[1] = -100  # one ignored row
    return {
        "add": ("(3,1,4)+(5,1)", lambda a, b: a + b, [p(3, 1, 4), p(5, 1)]),
        "sub": ("(3,1,4)-(4,)", lambda a, b: a - b, [p(3, 1, 4), p(4)]),
        "mul": ("(3,1,4)*(5,1)", lambda a, b: a * b, [p(3, 1, 4), p(5, 1)]),
        "div": ("(2,3)/(3,)", lambda a, b: a / b, [p(2, 3), p(3, positive=True)]),
        "pow": ("(2,3)**1.5", lambda a: a**1.5, [p(2, 3, positive=True)]),
        "neg": ("(2,3)", lambda a: -a, [p(2, 3)]),
        "matmul": ("(2,1,3,4)@(5,4,2)", lambda a, b: a @ b, [p(2, 1, 3, 4), p(5, 4, 2)]),
        "getitem": ("(4,3)[[0,2,2],1:]", lambda a: a[[0, 2, 2], 1:], [p(4, 3)]),
        "reshape": ("(2,3,4)->(6,4)", lambda a: a.reshape(6, 4), [p(2, 3, 4)]),
        "transpose": ("(2,3,4) swap 0,2", lambda a: a.transpose(0, 2), [p(2, 3, 4)]),
        "cat": ("(2,3)|(2,1) axis 1", lambda a, b: tg.cat([a, b], axis=1), [p(2, 3), p(2, 1)]),
        "split": ("(5,3) -> 2,3 axis 0", lambda a: a.split([2, 3])[1], [p(5, 3)]),
        "sum": ("(3,1,4) axis (0,2)", lambda a: a.sum(axis=(0, 2)), [p(3, 1, 4)]),
        "mean": ("(3,4) axis -1 keepdims", lambda a: a.mean(axis=-1, keepdims=True), [p(3, 4)]),
        "max": ("(3,5) axis 1", lambda a: a.max(axis=1), [p(3, 5)]),
        "var": ("(3,5) axis 0", lambda a: a.var(axis=0), [p(3, 5)]),
        "exp": ("(2,3)", lambda a: a.exp(), [p(2, 3)]),
        "log": ("(2,3)", lambda a: a.log(), [p(2, 3, positive=True)]),
        "tanh": ("(2,3)", lambda a: a.tanh(), [p(2, 3)]),
        "sqrt": ("(2,3)", lambda a: a.sqrt(), [p(2, 3, positive=True)]),
        "where": ("(3,1,4),(3,5,4)", lambda a, b: tg.where(mask, a, b), [p(3, 1, 4), p(3, 5, 4)]),
        "masked_fill": ("(3,1,4)", lambda a: a.masked_fill(mask, -1.0), [p(3, 1, 4)]),
        "linear": ("(2,3,5)x(4,5)+(4,)", F.linear, [p(2, 3, 5), p(4, 5), p(4)]),
        "embedding": ("ids (2,3), W (10,4)", lambda w: F.embedding(tokens, w), [p(10, 4)]),
        "layer_norm": ("(2,3,6)", F.layer_norm, [p(2, 3, 6), p(6), p(6)]),
        "gelu": ("(3,7)", F.gelu, [p(3, 7)]),
        "softmax": ("(3,5) axis 0", lambda a: F.softmax(a, axis=0), [p(3, 5)]),
        "log_softmax": ("(3,5)", F.log_softmax, [p(3, 5)]),
        "attention": ("q,k,v (2,2,5,3) causal", F.scaled_dot_product_attention, [p(2, 2, 5, 3), p(2, 2, 5, 3), p(2, 2, 5, 3)]),
        "attention_dropout": ("(1,2,4,3) p=0.3", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3),
                              [p(1, 2, 4, 3), p(1, 2, 4, 3), p(1, 2, 4, 3)]),
        "cross_entropy": ("(6,7), one ignored", lambda z: F.cross_entropy(z, targets), [p(6, 7)]),
        "dropout": ("(4,5) p=0.5", lambda a: F.dropout(a, 0.5), [p(4, 5)]),
    }
