"""Known mistakes in the layer-norm backward.

The derivation, per row of C values: xhat = (x - mean) * rstd, y = xhat * scale + shift. With
dxhat = dy * scale, x_j reaches xhat three ways (directly, through mean, through rstd):
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
and dscale = sum over rows of dy * xhat, dshift = sum over rows of dy."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)
EPS = 1e-5


def context(inputs, dout) -> Context:
    x, scale = inputs["x"], inputs["scale"]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt(var + EPS)
    dy = np.asarray(dout)
    return Context(x=x, scale=scale, mean=mean, var=var, rstd=rstd, xhat=(x - mean) * rstd, dy=dy, dxhat=dy * scale,
                   rows=tuple(range(x.ndim - 1)))


def dx_from(rstd, dxhat, xhat, mean=np.mean):
    return rstd * (dxhat - mean(dxhat, axis=-1, keepdims=True) - xhat * mean(dxhat * xhat, axis=-1, keepdims=True))


@mistake("no-rstd-path", "the path through rstd is missing: no - xhat * mean(dxhat * xhat)",
         """rstd = 1/sqrt(var + eps) and var depends on every x_j of the row, so x_j also moves xhat through rstd.
         d rstd / d x_j = - rstd^3 (x_j - mean) / C, and carried through xhat = (x - mean) * rstd this becomes
         the term - rstd * xhat * mean(dxhat * xhat) of dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))""")
def _(c):
    return {"dx": c.rstd * (c.dxhat - c.dxhat.mean(axis=-1, keepdims=True))}


@mistake("no-mean-path", "the path through mean is missing: no - mean(dxhat)",
         """mean = (1/C) sum_i x_i, so every x_j moves the mean, and the mean is subtracted from every element:
         d(x_i - mean)/dx_j = delta_ij - 1/C. The - 1/C part, summed over i against dxhat_i * rstd, is the term
         - rstd * mean(dxhat) of dx""")
def _(c):
    return {"dx": c.rstd * (c.dxhat - c.xhat * (c.dxhat * c.xhat).mean(axis=-1, keepdims=True))}


@mistake("constant-stats", "mean and rstd treated as constants: dx = dy * scale * rstd",
         """Only the direct path x_j -> xhat_j is there. But mean and var are computed from x, so x_j reaches
         every xhat_i of its row two more ways, through mean and through rstd; each path adds a term:
         dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))""")
def _(c):
    return {"dx": c.rstd * c.dxhat}


@mistake("no-scale", "dy used where dxhat = dy * scale belongs (the scale is missing)",
         """y = xhat * scale + shift, so the gradient reaching xhat is dxhat = dy * scale (the chain rule through
         the last line of the forward). Every term of dx is built from dxhat, not from dy""")
def _(c):
    return {"dx": dx_from(c.rstd, c.dy, c.xhat)}


@mistake("scale-on-first-term-only", "the scale applied to the first term only; the mean terms use dy",
         """dxhat = dy * scale is what reaches xhat, and all three paths from x_j start from xhat: the direct
         term, the one through mean and the one through rstd all use dxhat""")
def _(c):
    return {"dx": c.rstd * (c.dxhat - c.dy.mean(axis=-1, keepdims=True) - c.xhat * (c.dy * c.xhat).mean(axis=-1, keepdims=True))}


@mistake("unbiased-variance", "the variance recomputed with C - 1 (unbiased) instead of C",
         """The forward's variance is biased: var = (1/C) sum (x_i - mean)^2, so rstd and xhat use 1/C. np.var
         defaults to that, but x.var(ddof=1) or a torch.var default divides by C - 1 and gives another rstd and
         xhat. Use the cache's xhat and rstd, which are the forward's""")
def _(c):
    C = c.x.shape[-1]
    out = {"dx": [], "dscale": []}
    for eps in (EPS, 0.0):  # x.std(ddof=1) has no eps
        rstd = 1 / np.sqrt(c.var * C / (C - 1) + eps)
        xhat = (c.x - c.mean) * rstd
        out["dx"].append(dx_from(rstd, c.dxhat, xhat))
        out["dscale"].append((c.dy * xhat).sum(axis=c.rows))
    return out


@mistake("rstd-on-first-term-only", "rstd multiplies only the first term of dx",
         """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)): all three paths go through
         xhat = (x - mean) * rstd, so every term carries the factor rstd""")
def _(c):
    return {"dx": c.rstd * c.dxhat - c.dxhat.mean(axis=-1, keepdims=True) - c.xhat * (c.dxhat * c.xhat).mean(axis=-1, keepdims=True)}


@mistake("sum-not-mean", "sums over the row where the math has means (the 1/C is missing)",
         """Both extra terms come with 1/C: d mean/dx_j = 1/C, and d var/dx_j = (2/C)(x_j - mean). So they are
         means over the row, mean(dxhat) and mean(dxhat * xhat), not sums""")
def _(c):
    return {"dx": [dx_from(c.rstd, c.dxhat, c.xhat, mean=np.sum),
                   c.rstd * (c.dxhat - c.dxhat.mean(axis=-1, keepdims=True) - c.xhat * (c.dxhat * c.xhat).sum(axis=-1, keepdims=True)),
                   c.rstd * (c.dxhat - c.dxhat.sum(axis=-1, keepdims=True) - c.xhat * (c.dxhat * c.xhat).mean(axis=-1, keepdims=True))]}


@mistake("rstd-term-sign", "+ xhat * mean(dxhat * xhat) where the math subtracts it",
         """Raising x_j (above the mean) raises the variance, which lowers rstd and so shrinks every xhat_i:
         d rstd / d x_j = - rstd^3 (x_j - mean) / C is negative there. That minus sign makes the term
         - rstd * xhat * mean(dxhat * xhat)""")
def _(c):
    return {"dx": c.rstd * (c.dxhat - c.dxhat.mean(axis=-1, keepdims=True) + c.xhat * (c.dxhat * c.xhat).mean(axis=-1, keepdims=True))}


@mistake("std-for-rstd", "divided by rstd (or multiplied by the std) where the math multiplies by rstd",
         """rstd is the reciprocal standard deviation, 1/sqrt(var + eps): xhat = (x - mean) * rstd, so its
         derivative brings a factor rstd. Dividing by rstd is multiplying by the std""")
def _(c):
    inner = dx_from(c.rstd, c.dxhat, c.xhat) / c.rstd
    return {"dx": [inner / c.rstd, c.rstd * (c.dxhat - c.dxhat.mean(axis=-1, keepdims=True)) / c.rstd ** 2]}


@mistake("mean-wrong-axis", "the means of dx taken over the wrong axis",
         """Layer norm normalises each row of C values (the last axis) on its own: mean and var are over axis
         -1, so the two extra terms of dx are means over axis -1, with keepdims=True""")
def _(c):
    return {"dx": [dx_from(c.rstd, c.dxhat, c.xhat, mean=lambda a, axis, keepdims: a.mean(axis=ax, keepdims=True))
                   for ax in range(c.x.ndim - 1)]}


@mistake("x-for-xhat", "x (or x - mean) used where xhat belongs",
         """The rstd term comes out as - rstd * xhat * mean(dxhat * xhat), with xhat = (x - mean) * rstd, the
         normalised value the cache holds; x itself or x - mean is off by the mean and by a factor rstd""")
def _(c):
    xc = c.x - c.mean
    return {"dx": [dx_from(c.rstd, c.dxhat, c.x), dx_from(c.rstd, c.dxhat, xc)],
            "dscale": [(c.dy * c.x).sum(axis=c.rows), (c.dy * xc).sum(axis=c.rows)]}


@mistake("param-sum-axis", "dscale or dshift summed over only some of the broadcast axes",
         """scale and shift have shape [C] and are broadcast over every row, B and T alike: each is used at
         every (b, t), so its gradient adds the contributions of all of them: sum over axes (0, 1)""")
def _(c):
    out = {"dscale": [], "dshift": []}
    for axis in range(len(c.rows)):
        out["dscale"].append((c.dy * c.xhat).sum(axis=axis))
        out["dshift"].append(c.dy.sum(axis=axis))
    return out


@mistake("param-mean", "dscale or dshift averaged over the rows instead of summed",
         """scale is used at every one of the B*T rows, and each use adds its own contribution to the loss. The
         chain rule adds them up: dscale = sum of dy * xhat over the rows, not the mean""")
def _(c):
    return {"dscale": (c.dy * c.xhat).mean(axis=c.rows), "dshift": c.dy.mean(axis=c.rows)}


@mistake("dscale-no-xhat", "dscale without its factor xhat",
         """y = xhat * scale + shift: the derivative of y by scale is xhat (the value scale multiplies), so
         dscale = sum of dy * xhat. Without xhat it is dshift's formula""")
def _(c):
    return {"dscale": c.dy.sum(axis=c.rows)}


@mistake("dscale-times-scale", "dscale multiplied by scale",
         """d(xhat * scale)/d scale = xhat: the scale itself does not appear in its own gradient""")
def _(c):
    return {"dscale": (c.dy * c.xhat * c.scale).sum(axis=c.rows)}


@mistake("param-last-axis", "dscale or dshift summed over the last axis (C) instead of over the rows",
         """dscale has one value per channel c, shape [C]: sum over the rows (B and T), keeping the channel axis""")
def _(c):
    return {"dscale": (c.dy * c.xhat).sum(axis=-1), "dshift": c.dy.sum(axis=-1)}
