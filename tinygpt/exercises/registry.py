"""The exercises: for each, how its inputs are drawn, how the engine computes the expected
gradients, and how finite differences compute them a second way.

Inputs are drawn so that a mistake cannot hide: every size differs from every other (a
transposed gradient has the wrong shape, a sum over the wrong axis too), no weight is zero
or one, the upstream gradient is random rather than ones (forgetting to multiply by it
shows), and some embedding ids repeat while others are unused."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.exercises import answers, hints


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per exercise
class Exercise:
    name: str
    difficulty: str                     # easy / medium / hard
    summary: str
    dims: dict                          # the named sizes of the check, for hints ("B": 2, ...)
    draw: Callable                      # rng -> (inputs {name: array} in forward's order, dout)
    engine: Callable                    # (inputs, dout) -> {gradient name: array}, by tinygpt's own backward
    answer: Callable                    # the answer key: backward(dout, cache) in plain NumPy
    solution: Callable[[], str]         # the text --show-solution prints
    grads: tuple = ()                   # gradient names, in the order backward returns them
    numeric: Callable | None = None     # (inputs, dout) -> {name: array}; default: differences of the sheet's forward
    hints: tuple = field(default=())    # extra recognisers: (theirs, expected, case) -> hint or None

    @property
    def sheet(self):
        """The sheet module: the file `start` writes, and the reference forward."""
        return importlib.import_module(f"tinygpt.exercises.sheets.{self.name}")


def central_differences(objective: Callable[[], float], array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d objective / d array by (f(a + eps) - f(a - eps)) / 2 eps, element by element, with
    `array` changed in place and restored (objective reads it)."""
    grad = np.empty(array.shape)
    flat = array.reshape(-1)  # a view: callers pass contiguous float64 arrays
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + eps
        plus = objective()
        flat[i] = original - eps
        minus = objective()
        flat[i] = original
        grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def differentiable(inputs: dict) -> list[str]:
    """The names of the float inputs: the ones that get a gradient (integer ids do not)."""
    return [name for name, a in inputs.items() if np.asarray(a).dtype.kind == "f"]


def sheet_numeric(exercise: Exercise, inputs: dict, dout) -> dict:
    """Finite differences of L = sum(forward(inputs) * dout), the sheet's own forward."""
    arrays = {n: np.array(a, dtype=np.float64) if n in differentiable(inputs) else a for n, a in inputs.items()}
    objective = lambda: float((exercise.sheet.forward(*arrays.values())[0] * dout).sum())  # noqa: E731
    return {"d" + n: central_differences(objective, arrays[n]) for n in differentiable(inputs)}


def engine_grads(op: Callable) -> Callable:
    """(inputs, dout) -> gradients of op's float inputs by tinygpt's backward, in float64."""
    def run(inputs, dout):
        args = {n: tg.tensor(a, requires_grad=True, dtype=np.float64, device="cpu") if n in differentiable(inputs) else a
                for n, a in inputs.items()}
        op(*args.values()).backward(np.asarray(dout, dtype=np.float64))
        return {"d" + n: args[n].grad.numpy() for n in differentiable(inputs)}
    return run


def engine_source(*functions) -> Callable[[], str]:
    """The docstring (with its derivation) and the backward source of tinygpt's own ops,
    read when asked, so it always shows the engine as it is now."""
    def show():
        parts = []
        for cls in functions:
            parts.append(f"# tinygpt.functional.{cls.__name__}: {inspect.getsourcefile(cls)}\n"
                         f'"""{inspect.getdoc(cls)}"""\n\n{inspect.getsource(cls.backward)}')
        return "\n".join(parts)
    return show


def _signed(rng, *shape, low=0.3, high=1.3):
    """Values with |v| in [low, high] and random signs: no zeros, no ones pattern."""
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


def scales(rng, n):
    """Layer-norm scales: positive, at least 0.1 away from 1 (a scale of 1 hides a missing factor)."""
    return 1.0 + _signed(rng, n, low=0.1, high=0.5)


def _op(name, difficulty, summary, dims, draw, op, ops_shown, **extra) -> Exercise:
    inputs, _ = draw(np.random.default_rng(0))
    return Exercise(name, difficulty, summary, dims, draw, engine_grads(op), getattr(answers, name),
                    engine_source(*ops_shown), grads=tuple("d" + n for n in differentiable(inputs)), **extra)


EPS = 1e-5  # the layer_norm sheet's

OPS = [
    _op("linear", "easy", "y = x W^T + b: matrix products and the sum over rows for the bias",
        {"B": 2, "T": 3, "IN": 4, "OUT": 5},
        lambda rng: ({"x": _signed(rng, 2, 3, 4), "W": _signed(rng, 5, 4), "b": _signed(rng, 5)}, _signed(rng, 2, 3, 5)),
        F.linear, [F.Linear]),
    _op("embedding", "easy", "y = W[ids]: a scatter-add, with repeated ids",
        {"B": 2, "T": 3, "V": 7, "C": 5},
        lambda rng: ({"W": _signed(rng, 7, 5), "ids": np.array([[3, 0, 3], [5, 1, 0]])}, _signed(rng, 2, 3, 5)),
        lambda W, ids: F.embedding(ids, W), [F.Embedding], hints=(hints.repeated_ids,)),
    _op("layer_norm", "medium", "normalise each row, then scale and shift: three paths from x to y",
        {"B": 2, "T": 3, "C": 5},
        lambda rng: ({"x": rng.normal(0.3, 1.5, (2, 3, 5)), "scale": scales(rng, 5), "shift": _signed(rng, 5)},
                     _signed(rng, 2, 3, 5)),
        lambda x, scale, shift: F.layer_norm(x, scale, shift, eps=EPS), [F.LayerNorm], hints=(hints.layer_norm_paths,)),
    _op("gelu", "easy", "GPT-2's tanh GELU: an elementwise derivative and the chain rule",
        {"B": 2, "T": 3, "C": 5},
        lambda rng: ({"x": rng.normal(0.0, 1.5, (2, 3, 5))}, _signed(rng, 2, 3, 5)),
        F.gelu, [F.GELU]),
    _op("softmax", "medium", "softmax over the last axis: every output depends on every input of its row",
        {"B": 2, "T": 3, "C": 5},
        lambda rng: ({"x": rng.normal(0.0, 1.0, (2, 3, 5))}, _signed(rng, 2, 3, 5)),
        F.softmax, [F.Softmax], hints=(hints.softmax_row_term,)),
    _op("attention", "hard", "causal scaled dot-product attention: matmuls, a masked softmax, 1/sqrt(D)",
        {"B": 2, "H": 3, "T": 5, "D": 7},
        lambda rng: ({n: rng.normal(0.0, 1.0, (2, 3, 5, 7)) for n in ("q", "k", "v")}, _signed(rng, 2, 3, 5, 7)),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True), [F.ScaledDotProductAttention]),
    _op("cross_entropy", "medium", "mean of -log softmax(logits)[target]: softmax minus one-hot, over N",
        {"N": 6, "V": 5},
        lambda rng: ({"logits": rng.normal(0.0, 1.5, (6, 5)), "targets": rng.integers(0, 5, 6)}, 0.8),
        F.cross_entropy, [F.CrossEntropy]),
]
