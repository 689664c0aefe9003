"""Known mistakes in the GELU backward.

The derivation: y = 0.5 x (1 + t), t = tanh(u), u = c (x + 0.044715 x^3), c = sqrt(2/pi). The
product rule gives dy/dx = 0.5 (1 + t) + 0.5 x dt/dx, with dt/dx = (1 - t^2) du/dx and
du/dx = c (1 + 3 * 0.044715 x^2). Then dx = dy * dy/dx."""
from __future__ import annotations

import math

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)
A = 0.044715


def context(inputs, dout) -> Context:
    x = inputs["x"]
    c = np.sqrt(2 / np.pi)
    u = c * (x + A * x**3)
    return Context(x=x, dy=np.asarray(dout), c=c, u=u, t=np.tanh(u), du=c * (1 + 3 * A * x**2))


def local(c, first=None, dt=None, du=None, half=0.5):
    """0.5 (1 + t) + half * x * dt * du with parts replaced, dt = 1 - t^2 by default."""
    first = 0.5 * (1 + c.t) if first is None else first
    dt = 1 - c.t**2 if dt is None else dt
    du = c.du if du is None else du
    return first + half * c.x * dt * du


@mistake("no-3", "the 3 of the cubic's derivative is missing: d(0.044715 x^3)/dx = 3 * 0.044715 x^2",
         """u = c (x + 0.044715 x^3), so du/dx = c (1 + 3 * 0.044715 x^2): the power rule brings the exponent 3
         down in front. It is the last factor of the chain x -> u -> t -> y""")
def _(c):
    return {"dx": c.dy * local(c, du=c.c * (1 + A * c.x**2))}


@mistake("no-first-term", "the term 0.5 (1 + tanh(u)) of the product rule is missing",
         """y = 0.5 x (1 + t) is a product of x and (1 + t), both depending on x. The product rule gives
         0.5 (1 + t) (x differentiated) + 0.5 x dt/dx ((1 + t) differentiated); yours kept only the second""")
def _(c):
    return {"dx": c.dy * local(c, first=0)}


@mistake("no-second-term", "only 0.5 (1 + tanh(u)): the derivative of tanh(u) is missing",
         """y = 0.5 x (1 + t) with t = tanh(u(x)): x appears twice. Differentiating the x in front gives
         0.5 (1 + t); the x inside t gives 0.5 x (1 - t^2) du/dx, the product rule's second term""")
def _(c):
    return {"dx": c.dy * 0.5 * (1 + c.t)}


@mistake("one-minus-t", "1 - tanh(u) where the derivative of tanh is 1 - tanh(u)^2",
         """d tanh(u)/du = 1 - tanh(u)^2 (= sech(u)^2): the square matters""")
def _(c):
    return {"dx": c.dy * local(c, dt=1 - c.t)}


@mistake("sech-not-squared", "sech(u) = 1/cosh(u) where the derivative of tanh is sech(u)^2",
         """d tanh(u)/du = 1/cosh(u)^2 = 1 - tanh(u)^2: the cosh is squared""")
def _(c):
    return {"dx": c.dy * local(c, dt=1 / np.cosh(c.u))}


@mistake("one-plus-t-squared", "1 + tanh(u)^2 where the derivative of tanh is 1 - tanh(u)^2",
         """d tanh(u)/du = 1 - tanh(u)^2: tanh grows slower as it saturates, so the derivative falls from 1
         towards 0; with a plus it would grow""")
def _(c):
    return {"dx": c.dy * local(c, dt=1 + c.t**2)}


@mistake("no-c", "the factor sqrt(2/pi) of du/dx is missing",
         """u = sqrt(2/pi) (x + 0.044715 x^3): the constant in front stays in the derivative,
         du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)""")
def _(c):
    return {"dx": c.dy * local(c, du=1 + 3 * A * c.x**2)}


@mistake("no-inner-derivative", "du/dx is missing: the chain rule stops at tanh",
         """t = tanh(u(x)), so dt/dx = (1 - t^2) * du/dx with du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2):
         the chain rule multiplies the derivative of every step from x to t""")
def _(c):
    return {"dx": c.dy * local(c, du=1)}


@mistake("cube-not-differentiated", "the cubic left as it is in du/dx: 1 + 0.044715 x^3 (or x + 0.044715 x^3)",
         """du/dx differentiates x + 0.044715 x^3 term by term: 1 + 3 * 0.044715 x^2""")
def _(c):
    return {"dx": [c.dy * local(c, du=c.c * (1 + A * c.x**3)), c.dy * local(c, du=c.c * (c.x + A * c.x**3))]}


@mistake("no-half-second", "the 0.5 in front of x (1 - tanh^2) du/dx is missing",
         """y = 0.5 x (1 + t): the 0.5 multiplies the whole product, so both terms of the product rule keep it:
         0.5 (1 + t) + 0.5 x (1 - t^2) du/dx""")
def _(c):
    return {"dx": c.dy * local(c, half=1.0)}


@mistake("no-half", "the 0.5 of y = 0.5 x (1 + tanh(u)) is missing in both terms",
         """The 0.5 multiplies the whole product, so it multiplies the whole derivative""")
def _(c):
    return {"dx": c.dy * 2 * local(c)}


@mistake("no-dy", "the local derivative dy/dx alone: not multiplied by the upstream gradient dy",
         """backward receives dy = dL/dy and returns dL/dx = dL/dy * dy/dx: the chain rule multiplies the
         local derivative by what came from above, element by element""")
def _(c):
    return {"dx": local(c)}


@mistake("erf-derivative", "the derivative of the exact (erf) GELU, x Phi(x), not of the tanh approximation",
         """x Phi(x) has derivative Phi(x) + x phi(x). GPT-2 uses the tanh approximation
         0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))), whose derivative differs by up to about 1e-3: the
         backward must be the derivative of the forward that ran""")
def _(c):
    phi = np.exp(-c.x**2 / 2) / np.sqrt(2 * np.pi)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(c.x / np.sqrt(2)))
    return {"dx": c.dy * (cdf + c.x * phi)}


@mistake("tanh-of-x", "tanh taken of x (or of x + 0.044715 x^3 without sqrt(2/pi)) where the forward has tanh(u)",
         """t = tanh(u) with u = sqrt(2/pi) (x + 0.044715 x^3): the same u as the forward, in both 0.5 (1 + t)
         and 1 - t^2. Recompute it exactly, or save t in the cache""")
def _(c):
    out = []
    for t in (np.tanh(c.x), np.tanh(c.x + A * c.x**3)):
        out.append(c.dy * (0.5 * (1 + t) + 0.5 * c.x * (1 - t**2) * c.du))
    return {"dx": out}


@mistake("y-for-x", "the output y used where x belongs in the second term",
         """In 0.5 x (1 - t^2) du/dx the x is the input (the x in front of (1 + t) in the forward), not the
         output y = 0.5 x (1 + t)""")
def _(c):
    y = 0.5 * c.x * (1 + c.t)
    return {"dx": c.dy * (0.5 * (1 + c.t) + 0.5 * y * (1 - c.t**2) * c.du)}
