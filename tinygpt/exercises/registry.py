"""The exercises: for each, how its inputs are drawn, how the engine computes the expected
gradients, and how finite differences compute them a second way.

Inputs are drawn so that a mistake cannot hide: every size differs from every other (a
transposed gradient has the wrong shape, a sum over the wrong axis too), no weight is zero
or one, the upstream gradient is random rather than ones (forgetting to multiply by it
shows), and some embedding ids repeat while others are unused."""
from __future__ import annotations

import importlib
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.exercises import answers, hints
from tinygpt.gradcheck import central_differences


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per exercise
class Exercise:
    name: str
    difficulty: str                     # warm-up / easy / medium / hard
    summary: str
    dims: dict                          # the named sizes of the check, for hints ("B": 2, ...)
    draw: Callable                      # rng -> (inputs {name: array} in forward's order, dout)
    engine: Callable                    # (inputs, dout) -> {gradient name: array}, by tinygpt's own backward
    answer: Callable                    # the answer key: backward(dout, cache) in plain NumPy
    grads: tuple = ()                   # gradient names, in the order backward returns them
    numeric: Callable | None = None     # (inputs, dout) -> {name: array}; default: differences of the sheet's forward
    hints: tuple = field(default=())    # extra recognisers: (theirs, expected, case) -> hint or None
    flow: dict | None = None            # several steps: {grad: (the grads it is computed from, (d, ctx) -> grad)}
    regions: Callable | None = None     # (grad, inputs) -> [(words, bool mask)]: named places for hints
    fill: tuple = ("forward", "backward")  # the functions the learner's file must define
    driver: str | None = None           # a forward exercise: the sheet's function (learner module, *inputs) -> outputs
    memory: Callable | None = None      # inputs -> (bytes backward may hold at once, what a bigger peak means)

    @property
    def kind(self) -> str:
        """"backward" (the learner's backward is checked) or "forward" (the learner's functions,
        run by the sheet's driver, compute outputs that are checked)."""
        return "forward" if self.driver else "backward"

    @property
    def sheet(self):
        """The sheet module: the file `start` writes, and the reference forward."""
        return importlib.import_module(f"tinygpt.exercises.sheets.{self.name}")

    def solution(self) -> str:
        """The answer key, plain math in the sheet's own interface: what --show-solution prints."""
        where = self.answer.__module__.replace(".", "/") + ".py"
        if not self.driver:
            return f"# {self.name}: the answer key ({where})\n{inspect.getsource(self.answer)}"
        # a forward exercise's key holds the functions the sheet asks for: print them as the sheet has them
        functions = [textwrap.dedent(inspect.getsource(getattr(self.answer, f))).removeprefix("@staticmethod\n")
                     for f in self.fill]
        return f"# {self.name}: the answer key ({where}): {inspect.getdoc(self.answer)}\n" + "\n\n".join(functions)


def copy(inputs: dict) -> dict:
    """Fresh copies, so nothing the learner's code changes in place reaches the next step."""
    return {n: ({k: v.copy() for k, v in a.items()} if isinstance(a, dict) else np.array(a)) for n, a in inputs.items()}


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


def _signed(rng, *shape, low=0.3, high=1.3):
    """Values with |v| in [low, high] and random signs: no zeros, no ones pattern."""
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


def scales(rng, n):
    """Layer-norm scales: positive, at least 0.1 away from 1 (a scale of 1 hides a missing factor)."""
    return 1.0 + _signed(rng, n, low=0.1, high=0.5)


def _op(name, difficulty, summary, dims, draw, op, **extra) -> Exercise:
    inputs, _ = draw(np.random.default_rng(0))
    return Exercise(name, difficulty, summary, dims, draw, engine_grads(op), getattr(answers, name),
                    grads=tuple("d" + n for n in differentiable(inputs)), **extra)


def embedding_regions(grad, inputs) -> list:
    ids, counts = np.unique(inputs["ids"], return_counts=True)
    rows = np.arange(inputs["W"].shape[0])[:, None] + np.zeros(inputs["W"].shape[1:], dtype=int)
    return [(f"the rows of ids used more than once ({', '.join(map(str, ids[counts > 1]))})", np.isin(rows, ids[counts > 1])),
            ("the rows of ids no position uses", ~np.isin(rows, ids))]


def target_regions(grad, inputs) -> list:
    targets = np.zeros(inputs["logits"].shape, dtype=bool)
    targets[np.arange(len(inputs["targets"])), inputs["targets"]] = True
    return [("the target entries dlogits[r, targets[r]]", targets), ("the entries that are not targets", ~targets)]


EPS = 1e-5  # the layer_norm sheet's

OPS = [
    _op("linear", "easy", "y = x W^T + b: matrix products and the sum over rows for the bias",
        {"B": 2, "T": 3, "IN": 4, "OUT": 5},
        lambda rng: ({"x": _signed(rng, 2, 3, 4), "W": _signed(rng, 5, 4), "b": _signed(rng, 5)}, _signed(rng, 2, 3, 5)),
        F.linear),
    _op("embedding", "easy", "y = W[ids]: a scatter-add, with repeated ids",
        {"B": 2, "T": 3, "V": 7, "C": 5},
        lambda rng: ({"W": _signed(rng, 7, 5), "ids": np.array([[3, 0, 3], [5, 1, 0]])}, _signed(rng, 2, 3, 5)),
        lambda W, ids: F.embedding(ids, W), hints=(hints.repeated_ids,), regions=embedding_regions),
    _op("layer_norm", "medium", "normalise each row, then scale and shift: three paths from x to y",
        {"B": 2, "T": 3, "C": 5},
        lambda rng: ({"x": rng.normal(0.3, 1.5, (2, 3, 5)), "scale": scales(rng, 5), "shift": _signed(rng, 5)},
                     _signed(rng, 2, 3, 5)),
        lambda x, scale, shift: F.layer_norm(x, scale, shift, eps=EPS), hints=(hints.layer_norm_paths,)),
    _op("gelu", "easy", "GPT-2's tanh GELU: an elementwise derivative and the chain rule",
        {"B": 2, "T": 3, "C": 5},
        lambda rng: ({"x": rng.normal(0.0, 1.5, (2, 3, 5))}, _signed(rng, 2, 3, 5)),
        F.gelu),
    _op("softmax", "medium", "softmax over the last axis: every output depends on every input of its row",
        {"B": 2, "T": 3, "C": 5},
        lambda rng: ({"x": rng.normal(0.0, 1.0, (2, 3, 5))}, _signed(rng, 2, 3, 5)),
        F.softmax, hints=(hints.softmax_row_term,)),
    _op("attention", "hard", "causal scaled dot-product attention: matmuls, a masked softmax, 1/sqrt(D)",
        {"B": 2, "H": 3, "T": 5, "D": 7},
        lambda rng: ({n: rng.normal(0.0, 1.0, (2, 3, 5, 7)) for n in ("q", "k", "v")}, _signed(rng, 2, 3, 5, 7)),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True), hints=(hints.attention_scores,)),
    _op("cross_entropy", "medium", "mean of -log softmax(logits)[target]: softmax minus one-hot, over N",
        {"N": 6, "V": 5},
        lambda rng: ({"logits": rng.normal(0.0, 1.5, (6, 5)), "targets": rng.integers(0, 5, 6)}, 0.8),
        F.cross_entropy, regions=target_regions),
]
