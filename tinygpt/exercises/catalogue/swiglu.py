"""Known mistakes in the SwiGLU backward.

Going back one line at a time (s = sigmoid(gate)):
    y = h W_down^T        ->  dh = dy W_down,   dW_down = dy^T h (over all rows)
    h = act * up          ->  dact = dh * up,   dup = dh * act
    act = silu(gate)      ->  dgate = dact * s (1 + gate (1 - s))
    gate, up = x W^T      ->  dW_gate = dgate^T x,  dW_up = dup^T x,  dx = dgate W_gate + dup W_up"""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)


def rows(a):
    return a.reshape(-1, a.shape[-1])


def context(inputs, dout) -> Context:
    x, Wg, Wu, Wd = inputs["x"], inputs["W_gate"], inputs["W_up"], inputs["W_down"]
    gate, up = x @ Wg.T, x @ Wu.T
    s = 1 / (1 + np.exp(-gate))
    act = gate * s
    h = act * up
    dy = np.asarray(dout)
    dh = dy @ Wd
    c = Context(x=x, Wg=Wg, Wu=Wu, Wd=Wd, gate=gate, up=up, s=s, act=act, h=h, dy=dy, dh=dh,
                dup=dh * act, dact=dh * up)
    c.dgate = c.dact * s * (1 + gate * (1 - s))
    return c


def from_dgate(c, dgate, dup=None) -> dict:
    """The gradients that change when dgate (and dup, when given) do."""
    out = {"dx": dgate @ c.Wg + (c.dup if dup is None else dup) @ c.Wu, "dW_gate": rows(dgate).T @ rows(c.x)}
    if dup is not None:
        out["dW_up"] = rows(dup).T @ rows(c.x)
    if dup is not None and np.array_equal(dgate, c.dgate):
        del out["dW_gate"]
    return out


def silu_slope(g):
    s = 1 / (1 + np.exp(-g))
    return s * (1 + g * (1 - s))


@mistake("silu-sigmoid-only", "silu's derivative taken as sigmoid(gate): the gate * s (1 - s) part is missing",
         """silu(g) = g * s(g) is a product, so its derivative has two terms: s (from d g/dg = 1) plus
         g * s (1 - s) (from ds/dg = s (1 - s)). Together s (1 + g (1 - s))""")
def _(c):
    return from_dgate(c, c.dact * c.s)


@mistake("silu-sigmoid-slope", "silu's derivative taken as s (1 - s), the sigmoid's own derivative",
         """s (1 - s) is the derivative of the sigmoid; silu multiplies it by g: d(g s)/dg = s + g s (1 - s)""")
def _(c):
    return from_dgate(c, c.dact * c.s * (1 - c.s))


@mistake("silu-slope-form", "silu's derivative written as s + g (1 - s), s (1 + g s), s + g s^2 or with act for g",
         """d(g s)/dg = s + g * ds/dg with ds/dg = s (1 - s): so s + g s (1 - s) = s (1 + g (1 - s)), with g the
         gate itself (not act = g s). Each form here drops or changes one factor of that""")
def _(c):
    g, s = c.gate, c.s
    slopes = (s + g * (1 - s), s * (1 + g * s), s + g * s * s, s * (1 + c.act * (1 - s)))  # s + act (1 - s) is right
    return {k: [from_dgate(c, c.dact * slope)[k] for slope in slopes] for k in ("dx", "dW_gate")}


@mistake("silu-slope-wrong-point", "silu's derivative evaluated at act, up or x @ W_up.T instead of at gate",
         """The chain rule evaluates the derivative of silu where silu was applied, at gate = x W_gate^T. The
         cache's other arrays are not its input""")
def _(c):
    return {k: [from_dgate(c, c.dact * silu_slope(z))[k] for z in (c.act, c.up)] for k in ("dx", "dW_gate")}


@mistake("silu-skipped", "silu's backward skipped: dgate = dact (in dx, in dW_gate, or both)",
         """act = silu(gate) is a step of its own between gate and h: dgate = dact * silu'(gate), with
         silu'(g) = s (1 + g (1 - s)). dW_gate = dgate^T x and the gate path of dx start from dgate, not dact""")
def _(c):
    skipped = from_dgate(c, c.dact)
    return {"dx": skipped["dx"], "dW_gate": skipped["dW_gate"]}


@mistake("dup-no-act", "dup = dh: the factor act = silu(gate) of h = act * up is missing",
         """h = act * up is a product: the gradient of each factor is dh times the other factor, so
         dup = dh * act, and dact = dh * up""")
def _(c):
    return from_dgate(c, c.dgate, dup=c.dh)


@mistake("dact-no-up", "dact = dh: the factor up of h = act * up is missing",
         """h = act * up is a product: dact = dh * up (the other factor), then dgate = dact * silu'(gate)""")
def _(c):
    return from_dgate(c, c.dh * silu_slope(c.gate))


@mistake("dup-uses-gate", "dup = dh * gate: the gate before silu, where h multiplies by act = silu(gate)",
         """h = silu(gate) * up: the factor next to up is act = silu(gate), the activated gate, not gate""")
def _(c):
    return from_dgate(c, c.dgate, dup=c.dh * c.gate)


@mistake("product-factors-swapped", "the product rule's factors swapped: dact = dh * act and dup = dh * up",
         """For h = act * up each factor's gradient is dh times the OTHER factor: dact = dh * up, dup = dh * act""")
def _(c):
    return from_dgate(c, c.dh * c.act * silu_slope(c.gate), dup=c.dh * c.up)


@mistake("dx-one-path", "dx from one of the two paths only (through gate or through up)",
         """x feeds two lines of the forward, gate = x W_gate^T and up = x W_up^T; a value used twice gets the sum
         of both gradients: dx = dgate W_gate + dup W_up""")
def _(c):
    return {"dx": [c.dgate @ c.Wg, c.dup @ c.Wu]}


@mistake("dx-paths-crossed", "dx with the weights crossed: dgate W_up + dup W_gate",
         """Each path goes back through its own weight: dgate through W_gate (gate = x W_gate^T), dup through W_up""")
def _(c):
    return {"dx": c.dgate @ c.Wu + c.dup @ c.Wg}


@mistake("dW-transposed", "a weight's gradient transposed: x^T dgate (or h^T dy) instead of dgate^T x",
         """nn.Linear stores W as [out, in] and computes x W^T, so dW = dout^T x is [out, in] like W. x^T dout is
         its transpose, [in, out]""")
def _(c):
    return {"dW_gate": rows(c.x).T @ rows(c.dgate), "dW_up": rows(c.x).T @ rows(c.dup),
            "dW_down": rows(c.h).T @ rows(c.dy)}


@mistake("dW-one-row", "a weight's gradient from one batch element or one position only",
         """The weights are used at every (b, t): each use adds its own contribution, so dW sums dout^T x over
         all B*T rows (flatten them, or sum the per-row products)""")
def _(c):
    out = {"dW_gate": [], "dW_up": [], "dW_down": []}
    for index in ((0,), (-1,), (slice(None), 0), (slice(None), -1)):
        pick = lambda a: rows(a[index])  # noqa: E731
        out["dW_gate"].append(pick(c.dgate).T @ pick(c.x))
        out["dW_up"].append(pick(c.dup).T @ pick(c.x))
        out["dW_down"].append(pick(c.dy).T @ pick(c.h))
    return out


@mistake("dW-down-from-act", "dW_down = dy^T act (or dy^T up): the input of the down projection is h = act * up",
         """y = h W_down^T: W_down's gradient is dy^T times its own input, h, the gated product""")
def _(c):
    return {"dW_down": [rows(c.dy).T @ rows(c.act), rows(c.dy).T @ rows(c.up)]}

