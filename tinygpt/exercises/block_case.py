"""The block exercise: its inputs, the engine's gradients of every intermediate, and finite
differences for every intermediate.

The gradient of an intermediate (say h) is dL/dh with everything upstream of h held
fixed. Finite differences get it by changing h itself and running only the steps after
it, so the forward is also written here as a list of named steps (STEPS). The checker
confirms at run time that STEPS computes exactly what the sheet's forward does."""
from __future__ import annotations

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.exercises import answers, hints
from tinygpt.exercises.block_flow import FLOW
from tinygpt.exercises.registry import Exercise, scales
from tinygpt.gradcheck import central_differences
from tinygpt.exercises.sheets import block as sheet

B, T, C, H = 5, 4, 6, 2
D = C // H
PARAMS = ("scale1", "shift1", "W_q", "W_k", "W_v", "W_o", "b_o", "scale2", "shift2", "W_1", "b_1", "W_2", "b_2")
FUTURE = np.triu(np.ones((T, T), dtype=bool), k=1)


def draw(rng):
    p = {name: rng.normal(0.0, 0.5, (C, C)) for name in ("W_q", "W_k", "W_v", "W_o")}
    p.update(W_1=rng.normal(0.0, 0.4, (4 * C, C)), W_2=rng.normal(0.0, 0.2, (C, 4 * C)))
    for n, size in (("b_o", C), ("b_1", 4 * C), ("b_2", C), ("shift1", C), ("shift2", C)):
        p[n] = rng.uniform(0.1, 0.5, size) * rng.choice([-1.0, 1.0], size)
    p.update(scale1=scales(rng, C), scale2=scales(rng, C))
    return {"x": rng.normal(0.0, 1.0, (B, T, C)), "p": {n: p[n] for n in PARAMS}}, rng.normal(0.0, 1.0, (B, T, C))


def _heads(a):
    return a.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # [B, T, C] -> [B, H, T, D]


STEPS = (
    ("ln1", lambda e: sheet.layer_norm(e["x"], e["scale1"], e["shift1"])),
    ("q", lambda e: _heads(e["ln1"] @ e["W_q"].T)),
    ("k", lambda e: _heads(e["ln1"] @ e["W_k"].T)),
    ("v", lambda e: _heads(e["ln1"] @ e["W_v"].T)),
    ("scores", lambda e: e["q"] @ e["k"].swapaxes(-1, -2) / np.sqrt(D)),
    ("att", lambda e: sheet.softmax(np.where(FUTURE, -np.inf, e["scores"]))),
    ("ctx", lambda e: (e["att"] @ e["v"]).transpose(0, 2, 1, 3).reshape(B, T, C)),
    ("att_out", lambda e: e["ctx"] @ e["W_o"].T + e["b_o"]),
    ("x1", lambda e: e["x"] + e["att_out"]),
    ("ln2", lambda e: sheet.layer_norm(e["x1"], e["scale2"], e["shift2"])),
    ("h", lambda e: e["ln2"] @ e["W_1"].T + e["b_1"]),
    ("act", lambda e: sheet.gelu(e["h"])),
    ("ff_out", lambda e: e["act"] @ e["W_2"].T + e["b_2"]),
    ("out", lambda e: e["x1"] + e["ff_out"]),
)


def run_steps(env: dict, start: int = 0) -> dict:
    """env with STEPS[start:] (re)computed from what env holds."""
    env = dict(env)
    for name, step in STEPS[start:]:
        env[name] = step(env)
    return env


def numeric(inputs, dout) -> dict:
    """dL/d(every intermediate, x and every parameter) by central differences."""
    env = run_steps({"x": inputs["x"], **inputs["p"]})
    if not np.array_equal(env["out"], sheet.forward(inputs["x"], inputs["p"])[0]):
        raise RuntimeError("block exercise: STEPS no longer compute what the sheet's forward does")
    grads = {}
    for position, (name, _) in enumerate(STEPS[:-1]):
        value = np.array(env[name], dtype=np.float64, order="C")
        objective = lambda: float((run_steps({**env, name: value}, position + 1)["out"] * dout).sum())  # noqa: E731
        grads[name] = central_differences(objective, value)
    for name in ("x", *PARAMS):
        value = np.array(env[name], dtype=np.float64, order="C")
        objective = lambda: float((run_steps({**env, name: value})["out"] * dout).sum())  # noqa: E731
        grads[name] = central_differences(objective, value)
    return grads


def engine(inputs, dout) -> dict:
    """The same block built from tinygpt's ops, with every intermediate's gradient retained."""
    x = tg.tensor(inputs["x"], requires_grad=True, dtype=np.float64, device="cpu")
    p = {n: tg.tensor(a, requires_grad=True, dtype=np.float64, device="cpu") for n, a in inputs["p"].items()}
    heads = lambda a: a.reshape(B, T, H, D).transpose(1, 2)  # noqa: E731
    mask = tg.tensor(np.where(FUTURE, -np.inf, 0.0), dtype=np.float64, device="cpu")
    e = {"x": x}
    e["ln1"] = F.layer_norm(x, p["scale1"], p["shift1"], eps=sheet.EPS)
    for name, weight in (("q", "W_q"), ("k", "W_k"), ("v", "W_v")):
        e[name] = heads(F.linear(e["ln1"], p[weight]))
    e["scores"] = e["q"] @ e["k"].transpose(2, 3) * (1.0 / np.sqrt(D))
    e["att"] = F.softmax(e["scores"] + mask)
    e["ctx"] = (e["att"] @ e["v"]).transpose(1, 2).reshape(B, T, C)
    e["att_out"] = F.linear(e["ctx"], p["W_o"], p["b_o"])
    e["x1"] = x + e["att_out"]
    e["ln2"] = F.layer_norm(e["x1"], p["scale2"], p["shift2"], eps=sheet.EPS)
    e["h"] = F.linear(e["ln2"], p["W_1"], p["b_1"])
    e["act"] = F.gelu(e["h"])
    e["ff_out"] = F.linear(e["act"], p["W_2"], p["b_2"])
    for t in e.values():
        t.retain_grad()
    (e["x1"] + e["ff_out"]).backward(dout)
    return {name: t.grad.numpy() for name, t in {**e, **p}.items()}


def missing_path(theirs, expected, case: hints.Case):
    """x, x1 and ln1 are each used more than once; their gradient is the sum over the uses.
    Name the use whose gradient is missing (or the only one present)."""
    if case.grad not in ("x", "x1", "ln1"):
        return None
    _, cache = sheet.forward(case.inputs["x"], case.inputs["p"])
    d, p = answers.block(case.dout, cache), case.inputs["p"]
    merged = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, C)  # noqa: E731
    uses = {"x1": {"the residual out = x1 + ff_out": case.dout, "ln2 = layer_norm(x1)": d["x1"] - case.dout},
            "x": {"the residual x1 = x + att_out": d["x1"], "ln1 = layer_norm(x)": d["x"] - d["x1"]},
            "ln1": {f"{n} = ln1 @ W_{n}.T": merged(d[n]) @ p[f"W_{n}"] for n in "qkv"}}[case.grad]
    for use, part in uses.items():
        if hints.same(theirs, expected - part) or (len(uses) == 2 and hints.same(theirs, part)):
            missing = use if hints.same(theirs, expected - part) else next(u for u in uses if u != use)
            return (f"missing a path: the gradient through {missing} is not in yours. {case.grad} is used in "
                    f"{len(uses)} places, so its gradient is the sum of the gradients of all its uses")
    return None


def regions(grad, inputs) -> list:
    if grad not in ("scores", "att"):
        return []
    masked = np.broadcast_to(FUTURE, (B, H, T, T))
    return [("the masked positions (a key after its query)", masked), ("the positions that are not masked", ~masked)]


BLOCK = Exercise("block", "hard", "a whole pre-norm GPT-2 block: the gradient of every intermediate, backprop-ninja style",
                 {"B": B, "T": T, "C": C, "H": H, "D": D, "4C": 4 * C}, draw, engine, answers.block,
                 grads=sheet.GRADIENTS, numeric=numeric, hints=(missing_path,), flow=FLOW, regions=regions)
