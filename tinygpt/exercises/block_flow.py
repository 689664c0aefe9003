"""The block's backward as a data flow: each gradient, the gradients it is computed from,
and the one step that computes it.

The checker uses it to follow the learner's own numbers: a gradient that is right given
the learner's (wrong) gradients flowing into it only inherits their error, while one that
is wrong even given them has a mistake of its own. A parameter's gradient feeds nothing,
so it never passes an error on. Each step quotes the forward line it inverts."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises import answers
from tinygpt.exercises.sheets import layer_norm as layer_norm_sheet


def rows(a):
    return a.reshape(-1, a.shape[-1])  # [B, T, n] -> [B*T, n]


def heads(a, c):
    B, T, C = a.shape
    return a.reshape(B, T, c.H, C // c.H).transpose(0, 2, 1, 3)  # [B, T, C] -> [B, H, T, D]


def merge(a):
    B, H, T, D = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # [B, H, T, D] -> [B, T, C]


def layer_norm_back(c, which: int, dy):
    """(dx, dscale, dshift) of ln{which} = layer_norm(x or x1, scale{which}, shift{which})."""
    x = c.x if which == 1 else c.x1
    _, cache = layer_norm_sheet.forward(x, c.p[f"scale{which}"], c.p[f"shift{which}"])
    return answers.layer_norm(dy, cache)


def _linear(output, x, weight):
    """y = x @ W.T + b: dx = dy @ W, dW = dy^T x over all rows, db = sum of dy over rows."""
    return {
        weight: ((output,), lambda d, c: rows(d[output]).T @ rows(getattr(c, x))),
        x: ((output,), lambda d, c: d[output] @ c.p[weight]),
    }


FLOW = {
    "ff_out": (("out",), lambda d, c: d["out"]),                                # out = x1 + ff_out
    **_linear("ff_out", "act", "W_2"),                                          # ff_out = act @ W_2.T + b_2
    "b_2": (("ff_out",), lambda d, c: d["ff_out"].sum(axis=(0, 1))),
    "h": (("act",), lambda d, c: answers.gelu(d["act"], (c.h,))),               # act = gelu(h)
    **_linear("h", "ln2", "W_1"),                                               # h = ln2 @ W_1.T + b_1
    "b_1": (("h",), lambda d, c: d["h"].sum(axis=(0, 1))),
    "scale2": (("ln2",), lambda d, c: layer_norm_back(c, 2, d["ln2"])[1]),      # ln2 = layer_norm(x1, ...)
    "shift2": (("ln2",), lambda d, c: layer_norm_back(c, 2, d["ln2"])[2]),
    "x1": (("out", "ln2"), lambda d, c: d["out"] + layer_norm_back(c, 2, d["ln2"])[0]),
    "att_out": (("x1",), lambda d, c: d["x1"]),                                 # x1 = x + att_out
    **_linear("att_out", "ctx", "W_o"),                                         # att_out = ctx @ W_o.T + b_o
    "b_o": (("att_out",), lambda d, c: d["att_out"].sum(axis=(0, 1))),
    "att": (("ctx",), lambda d, c: heads(d["ctx"], c) @ c.v.swapaxes(-1, -2)),  # ctx = merge(att @ v)
    "v": (("ctx",), lambda d, c: c.att.swapaxes(-1, -2) @ heads(d["ctx"], c)),
    "scores": (("att",), lambda d, c: answers.softmax(d["att"], (c.att,))),    # att = softmax(masked scores)
    "q": (("scores",), lambda d, c: d["scores"] @ c.k / np.sqrt(c.D)),          # scores = q @ k^T / sqrt(D)
    "k": (("scores",), lambda d, c: d["scores"].swapaxes(-1, -2) @ c.q / np.sqrt(c.D)),
    **{f"W_{n}": ((n,), lambda d, c, n=n: rows(merge(d[n])).T @ rows(c.ln1)) for n in "qkv"},  # q = heads(ln1 @ W_q.T)
    "ln1": (("q", "k", "v"), lambda d, c: sum(merge(d[n]) @ c.p[f"W_{n}"] for n in "qkv")),
    "scale1": (("ln1",), lambda d, c: layer_norm_back(c, 1, d["ln1"])[1]),      # ln1 = layer_norm(x, ...)
    "shift1": (("ln1",), lambda d, c: layer_norm_back(c, 1, d["ln1"])[2]),
    "x": (("x1", "ln1"), lambda d, c: d["x1"] + layer_norm_back(c, 1, d["ln1"])[0]),
}
