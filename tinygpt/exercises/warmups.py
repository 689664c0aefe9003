"""The warm-ups: micrograd-sized exercises, one small op each, then a two-layer MLP.

Same checker and same rules as the fused ops: the expected gradients come from tinygpt's
own small ops (Tensor +, *, /, **, exp, log, tanh, @, sum, mean, reshape, transpose,
indexing), and finite differences of the sheet's forward confirm them."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises import answers_warmup
from tinygpt.exercises.registry import Exercise, differentiable, engine_grads
from tinygpt.exercises.sheets import mlp as mlp_sheet
from tinygpt.gradcheck import central_differences


def _signed(rng, *shape, low=0.3, high=1.3):
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


def _warmup(name, summary, dims, draw, op) -> Exercise:
    inputs, _ = draw(np.random.default_rng(0))
    return Exercise(name, "warm-up", summary, dims, draw, engine_grads(op), getattr(answers_warmup, name),
                    grads=tuple("d" + n for n in differentiable(inputs)))


def _unary(rng):
    return {"a": _signed(rng, 3, 4)}, _signed(rng, 3, 4)


def _binary(rng):
    return {"a": _signed(rng, 3, 4), "b": _signed(rng, 3, 4)}, _signed(rng, 3, 4)


BC = {"B": 3, "C": 4}
SMALL_OPS = [
    _warmup("add", "a + b with b broadcast over the rows: a broadcast value's gradient is a sum", BC,
            lambda rng: ({"a": _signed(rng, 3, 4), "b": _signed(rng, 4)}, _signed(rng, 3, 4)), lambda a, b: a + b),
    _warmup("mul", "a * b: each factor's gradient is dout times the other factor", BC, _binary, lambda a, b: a * b),
    _warmup("div", "a / b: the quotient rule, or a times b to the -1", BC, _binary, lambda a, b: a / b),
    _warmup("pow", "a ** 3: the power rule", BC, _unary, lambda a: a**3),
    _warmup("exp", "exp(a): its own derivative", BC, _unary, lambda a: a.exp()),
    _warmup("log", "log(a): 1/a", BC,
            lambda rng: ({"a": rng.uniform(0.3, 2.5, (3, 4))}, _signed(rng, 3, 4)), lambda a: a.log()),
    _warmup("tanh", "tanh(a): 1 - tanh^2, from the forward's output", BC, _unary, lambda a: a.tanh()),
    _warmup("sum", "a.sum(axis=1): a sum's backward is a broadcast", BC,
            lambda rng: ({"a": _signed(rng, 3, 4)}, _signed(rng, 3)), lambda a: a.sum(axis=1)),
    _warmup("mean", "a.mean(axis=0): a sum, divided by how many it averages", BC,
            lambda rng: ({"a": _signed(rng, 3, 4)}, _signed(rng, 4)), lambda a: a.mean(axis=0)),
    _warmup("reshape_transpose", "transpose then reshape: undo them in reverse order", {"B": 2, "T": 3, "C": 4},
            lambda rng: ({"a": _signed(rng, 2, 3, 4)}, _signed(rng, 2, 12)), lambda a: a.transpose(1, 2).reshape(2, 12)),
    _warmup("getitem", "a[rows] with a repeated row: the gradient goes back where it came from, and adds", {"V": 5, "C": 4, "N": 3},
            lambda rng: ({"a": _signed(rng, 5, 4), "rows": np.array([3, 0, 3])}, _signed(rng, 3, 4)), lambda a, rows: a[rows]),
    _warmup("matmul", "a @ b: two matrix products, their order read from the shapes", {"N": 3, "K": 4, "M": 5},
            lambda rng: ({"a": _signed(rng, 3, 4), "b": _signed(rng, 4, 5)}, _signed(rng, 3, 5)), lambda a, b: a @ b),
]


# ------------------------------------------------------------------ the MLP, one gradient per intermediate

MLP_STEPS = (
    ("h_pre", lambda e: e["x"] @ e["W1"] + e["b1"]),
    ("h", lambda e: np.tanh(e["h_pre"])),
    ("logits", lambda e: e["h"] @ e["W2"] + e["b2"]),
)
MLP_PARAMS = ("x", "W1", "b1", "W2", "b2")


def _mlp_draw(rng):
    inputs = {"x": _signed(rng, 4, 3), "W1": _signed(rng, 3, 5, low=0.2, high=0.9), "b1": _signed(rng, 5, low=0.1, high=0.5),
              "W2": _signed(rng, 5, 2), "b2": _signed(rng, 2, low=0.1, high=0.5)}
    return inputs, _signed(rng, 4, 2)


def _run(env: dict, start: int = 0) -> dict:
    env = dict(env)
    for name, step in MLP_STEPS[start:]:
        env[name] = step(env)
    return env


def _mlp_numeric(inputs, dout) -> dict:
    """dL/d(every intermediate and input) by central differences, changing one value and
    running only the steps after it."""
    env = _run({n: np.array(a, dtype=np.float64) for n, a in inputs.items()})
    grads = {}
    for position, name in enumerate([n for n, _ in MLP_STEPS] + list(MLP_PARAMS)):
        start = position + 1 if position < len(MLP_STEPS) else 0
        value = np.array(env[name], dtype=np.float64, order="C")
        grads[name] = central_differences(lambda: float((_run({**env, name: value}, start)["logits"] * dout).sum()), value)
    return grads


def _mlp_engine(inputs, dout) -> dict:
    import tinygpt as tg

    t = {n: tg.tensor(a, requires_grad=True, dtype=np.float64, device="cpu") for n, a in inputs.items()}
    t["h_pre"] = t["x"] @ t["W1"] + t["b1"]
    t["h"] = t["h_pre"].tanh()
    t["logits"] = t["h"] @ t["W2"] + t["b2"]
    for name in ("h_pre", "h", "logits"):
        t[name].retain_grad()
    t["logits"].backward(np.asarray(dout, dtype=np.float64))
    return {name: tensor.grad.numpy() for name, tensor in t.items()}


MLP_FLOW = {
    "logits": (("out",), lambda d, c: d["out"]),
    "W2": (("logits",), lambda d, c: c.h.T @ d["logits"]),             # logits = h @ W2 + b2
    "b2": (("logits",), lambda d, c: d["logits"].sum(axis=0)),
    "h": (("logits",), lambda d, c: d["logits"] @ c.W2.T),
    "h_pre": (("h",), lambda d, c: d["h"] * (1 - c.h**2)),             # h = tanh(h_pre)
    "W1": (("h_pre",), lambda d, c: c.x.T @ d["h_pre"]),               # h_pre = x @ W1 + b1
    "b1": (("h_pre",), lambda d, c: d["h_pre"].sum(axis=0)),
    "x": (("h_pre",), lambda d, c: d["h_pre"] @ c.W1.T),
}

MLP = Exercise("mlp", "warm-up", "a two-layer MLP with tanh: the gradient of every intermediate, backprop-ninja style",
               {"N": 4, "IN": 3, "HID": 5, "OUT": 2}, _mlp_draw, _mlp_engine, answers_warmup.mlp,
               grads=mlp_sheet.GRADIENTS, numeric=_mlp_numeric, flow=MLP_FLOW)

WARMUPS = (*SMALL_OPS, MLP)
