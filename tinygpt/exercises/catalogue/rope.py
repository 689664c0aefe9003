"""Known mistakes in the RoPE backward.

y = x cos + rotate_half(x) sin is R(a) x for each pair (x1_i, x2_i) = (x[i], x[i + D/2]).
It is linear in x, so dx = R(a)^T dy, and R(a)^T = R(-a), the rotation back:
    dx1 = g1 cos + g2 sin,   dx2 = g2 cos - g1 sin,   i.e.   dx = g cos - rotate_half(g) sin.
The positions start after the KV cache; the angles are positions * THETA^(-2i/D)."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder
from tinygpt.exercises.sheets.rope import THETA, cos_sin, rotate_half

MISTAKES: list = []
mistake = recorder(MISTAKES)


def context(inputs, dout) -> Context:
    x, positions = inputs["x"], inputs["positions"]
    cos, sin = cos_sin(positions, x.shape[-1])
    return Context(x=x, positions=positions, D=x.shape[-1], T=x.shape[-2], cos=cos, sin=sin, dy=np.asarray(dout))


def back(g, cos, sin):
    return g * cos - rotate_half(g) * sin


@mistake("forward-rotation", "the forward's rotation again (+ rotate_half(dy) sin): R(a) dy, not R(a)^T dy",
         """y = R(a) x is linear in x, so dx = R(a)^T dy. A rotation's transpose is its inverse, the rotation by
         -a: cos(-a) = cos a, sin(-a) = -sin a, so the sin term changes sign: dx = dy cos - rotate_half(dy) sin.
         Rotating dy forward by a turns it twice as far from the right answer""")
def _(c):
    return {"dx": c.dy * c.cos + rotate_half(c.dy) * c.sin}


@mistake("no-sin-term", "only dy * cos: the rotate_half(dy) * sin term is missing",
         """Each output y1 = x1 cos - x2 sin mixes both members of its pair, so x1 also reaches y2 = x2 cos + x1 sin.
         dx1 = g1 cos + g2 sin: the second half of the gradient comes back through sin""")
def _(c):
    return {"dx": c.dy * c.cos}


@mistake("identity", "dx = dy: the rotation treated as if it changed nothing",
         """RoPE is a rotation, so it keeps lengths, but it changes directions: the gradient must be turned back
         by the same angles, dx = R(-a) dy = dy cos - rotate_half(dy) sin""")
def _(c):
    return {"dx": c.dy}


@mistake("positions-from-zero", "the angles rebuilt with other positions than the cache's: from 0, off by one, or the "
         "cache length added twice",
         """Behind a KV cache the T new tokens sit at positions START, ..., START + T - 1, and the forward turned
         each by its own position's angles. Rebuilding cos and sin from np.arange(T), or from positions + 1,
         turns the gradient back by other angles: use the positions (or the cos and sin) of the cache""")
def _(c):
    start = int(c.positions[0])
    out = []
    for positions in (np.arange(c.T), np.arange(1, c.T + 1), np.arange(start + 1, start + c.T + 1),
                      np.arange(start - 1, start + c.T - 1), c.positions + start):  # the cache length added twice
        cos, sin = cos_sin(positions, c.D)
        out.append(back(c.dy, cos, sin))
    return {"dx": out}


@mistake("rotate-half-no-minus", "the sin term's sign wrong in one half: rotate_half without its minus, (x2, x1)",
         """R(a)^T dy gives dx1 = g1 cos + g2 sin and dx2 = g2 cos - g1 sin: the two halves take the sin term with
         opposite signs, which - rotate_half(g) sin does at once, because rotate_half is a quarter turn of every
         pair, (x1, x2) -> (-x2, x1). Swapping the halves without the minus (or a sign slip in dx1 or dx2 alone)
         turns one half the right way and the other the wrong way""")
def _(c):
    half = c.D // 2
    swapped = np.concatenate([c.dy[..., half:], c.dy[..., :half]], axis=-1)
    return {"dx": [c.dy * c.cos - swapped * c.sin, c.dy * c.cos + swapped * c.sin]}


@mistake("interleaved-pairs", "the pairs taken as neighbours (x[2i], x[2i+1]), the paper's layout, not Hugging Face's halves",
         """The original RoPE paper pairs neighbours; Hugging Face's rotate-half layout (this forward, and every
         Llama checkpoint on the Hub) pairs x[i] with x[i + D/2]. The backward must undo the same pairing the
         forward used""")
def _(c):
    half = c.D // 2
    cos, sin = c.cos[:, :half], c.sin[:, :half]              # angle i for pair i
    g_even, g_odd = c.dy[..., 0::2], c.dy[..., 1::2]
    out = np.empty_like(c.dy)
    out[..., 0::2], out[..., 1::2] = g_even * cos + g_odd * sin, g_odd * cos - g_even * sin
    return {"dx": out}


@mistake("cos-sin-swapped", "cos and sin swapped",
         """The forward is y = x cos + rotate_half(x) sin: x itself goes with cos (at angle 0 the rotation is the
         identity), its quarter turn with sin. The backward keeps that: dx = dy cos - rotate_half(dy) sin""")
def _(c):
    return {"dx": [c.dy * c.sin - rotate_half(c.dy) * c.cos, c.dy * c.sin + rotate_half(c.dy) * c.cos]}


@mistake("frequencies", "the frequencies rebuilt wrongly: THETA^(-i/D) (the 2 missing), or over all D indices",
         """Pair i turns at f_i = THETA^(-2i/D) for i = 0 .. D/2 - 1 (np.arange(0, D, 2) / D), the same angle in
         both halves. Rebuilding the angles with another exponent turns the gradient back by other angles: use
         the cache's cos and sin""")
def _(c):
    out = []
    p = c.positions[:, None]
    for f in (THETA ** (-np.arange(c.D // 2) / c.D), THETA ** (-2 * np.arange(c.D // 2) / (c.D // 2))):
        a = np.concatenate([p * f, p * f], axis=-1)
        out.append(back(c.dy, np.cos(a), np.sin(a)))
    a = p * THETA ** (-np.arange(c.D) / c.D)
    out.append(back(c.dy, np.cos(a), np.sin(a)))
    return {"dx": out}


@mistake("angles-not-doubled", "the angles of the first half used in the second half in another order",
         """cos and sin are [T, D] with the D/2 angles repeated once per half (np.concatenate([a, a])), so that
         x[i] and x[i + D/2], a pair, turn by the same angle. np.repeat(a, 2) interleaves them instead, and
         reversing a half pairs the wrong angles""")
def _(c):
    half = c.D // 2
    a = c.positions[:, None] * THETA ** (-np.arange(0, c.D, 2) / c.D)
    out = []
    for angles in (np.repeat(a, 2, axis=-1), np.concatenate([a, a[:, ::-1]], axis=-1)):
        out.append(back(c.dy, np.cos(angles), np.sin(angles)))
    return {"dx": out if half > 1 else []}


@mistake("sin-term-only", "only the rotate_half(dy) * sin term: the dy * cos term is missing",
         """Each y_i keeps a share cos a of its own x_i (y1 = x1 cos - x2 sin), so dx_i gets dy_i cos a back
         directly, besides the share of its pair's gradient through sin""")
def _(c):
    return {"dx": [-rotate_half(c.dy) * c.sin, rotate_half(c.dy) * c.sin]}

