"""Known mistakes in the warm-ups, a few per small op and more for the MLP.

One catalogue per warm-up: CATALOGUES[name] has `context` and `MISTAKES`, as the fused
ops' modules do. The context holds the inputs by name, the forward's output `out` and dout
as `dy`; the MLP's also holds its intermediates and, as the block's, `d`."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

CATALOGUES: dict = {}


def _catalogue(name: str):
    mistakes: list = []
    CATALOGUES[name] = SimpleNamespace(context=_context(name), MISTAKES=mistakes)
    return recorder(mistakes)


def _context(name):
    def context(inputs, dout):
        from tinygpt.exercises import EXERCISES

        out, cache = EXERCISES[name].sheet.forward(*inputs.values())
        extra = cache if isinstance(cache, dict) else {}
        return Context(**{**inputs, **extra}, out=out, dy=np.asarray(dout))
    return context


NO_DY = """backward gets dout = dL/dout and returns dL/da = dout * dout/da: the chain rule multiplies the local
derivative by the gradient flowing in. Without dout, yours is the local derivative alone"""

m = _catalogue("add")


@m("db-not-summed", "db not summed over the rows it was broadcast to", """b [C] was added to each of the B rows,
   so it was used B times; a value used several times gets the sum of its uses' gradients: db = dout.sum(axis=0)""")
def _(c):
    return {"db": [c.dy, c.dy[0], c.dy[-1]]}


@m("db-mean", "db averaged over the rows instead of summed", """Each row's use of b adds its own part to the
   loss, so the gradients add: db = dout.sum(axis=0), not the mean""")
def _(c):
    return {"db": c.dy.mean(axis=0)}


@m("db-wrong-axis", "db summed over the wrong axis (axis 1, or everything)", """b has one value per column c and
   was repeated down the rows (axis 0): sum over axis 0, keep axis 1""")
def _(c):
    return {"db": [c.dy.sum(axis=1), np.full(c.b.shape, c.dy.sum())]}


@m("ones", "ones where the gradient is dout: d(a + b)/da = 1 is only the local derivative", NO_DY)
def _(c):
    return {"da": np.ones_like(c.a), "db": [np.ones_like(c.b), np.full(c.b.shape, float(c.a.shape[0]))]}


m = _catalogue("mul")


@m("same-factor", "each factor's gradient uses itself instead of the other factor", """d(a * b)/da = b: the
   gradient of a factor is dout times the OTHER factor (a nudge to a changes the product by b times it)""")
def _(c):
    return {"da": c.dy * c.a, "db": c.dy * c.b}


@m("no-dout", "the other factor alone, not multiplied by dout", NO_DY)
def _(c):
    return {"da": c.b, "db": c.a}


@m("product", "dout * a * b (the product itself) as a gradient", """d(a * b)/da = b, not a * b: the factor
   being differentiated drops out""")
def _(c):
    return {"da": c.dy * c.a * c.b, "db": c.dy * c.a * c.b}


m = _catalogue("div")


@m("db-plus", "db with a plus sign: the derivative of 1/b is -1/b^2", """a / b = a * b^-1, and
   d(b^-1)/db = -b^-2: raising b lowers a / b, so db = -dout * a / b^2""")
def _(c):
    return {"db": c.dy * c.a / c.b**2}


@m("db-no-a", "db without a: -dout / b^2", """d(a / b)/db = -a / b^2: the numerator a stays as a factor""")
def _(c):
    return {"db": -c.dy / c.b**2}


@m("db-not-squared", "db with b where the math has b^2", """a / b = a * b^-1, and the power rule gives
   d(b^-1)/db = -1 * b^-2: b squared""")
def _(c):
    return {"db": [-c.dy * c.a / c.b, c.dy * c.a / c.b]}


@m("da-times-b", "da = dout * b, as for a product", """a / b = a * (1/b): the factor multiplying a is 1/b, so
   da = dout / b""")
def _(c):
    return {"da": c.dy * c.b}


m = _catalogue("pow")


@m("no-exponent", "the exponent not brought down: a^2 where the power rule gives 3 a^2", """d(a^n)/da =
   n a^(n - 1): the 3 comes down in front""")
def _(c):
    return {"da": c.dy * c.a**2}


@m("exponent-not-lowered", "3 a^3: the exponent kept at 3 instead of lowered to 2", """d(a^n)/da = n a^(n-1):
   the power drops by one""")
def _(c):
    return {"da": c.dy * 3 * c.a**3}


@m("no-dout", "the local derivative 3 a^2 alone, not multiplied by dout", NO_DY)
def _(c):
    return {"da": 3 * c.a**2}


m = _catalogue("exp")


@m("times-a", "dout * a: the derivative of exp is exp itself", """d exp(a)/da = exp(a), which the forward
   already computed (out): da = dout * out""")
def _(c):
    return {"da": [c.dy * c.a, c.dy * c.a * c.out]}


@m("no-dout", "exp(a) alone, not multiplied by dout", NO_DY)
def _(c):
    return {"da": c.out}


@m("dout-only", "dout passed through unchanged", """exp is not the identity: its local derivative exp(a)
   multiplies dout""")
def _(c):
    return {"da": c.dy}


m = _catalogue("log")


@m("times-a", "dout * a where the derivative of log(a) is 1/a", """d log(a)/da = 1/a: log grows fast where a is small and slowly
   where a is large, so the gradient is da = dout / a, with no a multiplied in""")
def _(c):
    return {"da": c.dy * c.a}


@m("log-again", "dout * log(a): the function, not its derivative", """Unlike exp, log is not its own derivative:
   d log(a)/da = 1/a, so da = dout / a""")
def _(c):
    return {"da": c.dy * c.out}


@m("minus-or-square", "-1/a or 1/a^2: the derivative of 1/a, not of log(a)", """d log(a)/da = 1/a; -1/a^2 is
   the derivative of 1/a, one step further""")
def _(c):
    return {"da": [-c.dy / c.a, c.dy / c.a**2, -c.dy / c.a**2]}


@m("no-dout", "1/a alone, not multiplied by dout", NO_DY)
def _(c):
    return {"da": 1 / c.a}


m = _catalogue("tanh")


@m("not-squared", "1 - tanh(a) where the derivative is 1 - tanh(a)^2", """d tanh(a)/da = 1 - tanh(a)^2: the
   square is part of it""")
def _(c):
    return {"da": c.dy * (1 - c.out)}


@m("a-for-out", "1 - a^2: the input where the output tanh(a) belongs", """d tanh(a)/da = 1 - tanh(a)^2, written
   with the forward's output out = tanh(a), not with a""")
def _(c):
    return {"da": c.dy * (1 - c.a**2)}


@m("plus", "1 + tanh(a)^2 where the derivative is 1 - tanh(a)^2", """tanh flattens as it saturates, so its
   derivative 1 - tanh^2 falls from 1 to 0""")
def _(c):
    return {"da": c.dy * (1 + c.out**2)}


@m("no-dout", "1 - tanh(a)^2 alone, not multiplied by dout", NO_DY)
def _(c):
    return {"da": 1 - c.out**2}


m = _catalogue("sum")


@m("ones", "ones: the local derivative of a sum, without dout", NO_DY)
def _(c):
    return {"da": np.ones_like(c.a)}


@m("mean", "dout divided by the number of terms summed", """out[i] = sum_j a[i, j]: each term counts fully
   (weight 1), so da[i, j] = dout[i]. A 1/C belongs to a mean""")
def _(c):
    return {"da": np.broadcast_to(c.dy[:, None] / c.a.shape[1], c.a.shape)}


@m("total", "every element given dout.sum(): the rows mixed", """a[i, j] only feeds out[i], so its gradient is
   dout[i] alone""")
def _(c):
    return {"da": np.full(c.a.shape, c.dy.sum())}


m = _catalogue("mean")


@m("no-divide", "dout copied without the 1/B of the mean", """out[j] = (1/B) sum_i a[i, j]: each term has weight
   1/B, so da[i, j] = dout[j] / B""")
def _(c):
    return {"da": np.broadcast_to(c.dy, c.a.shape)}


@m("wrong-count", "divided by the size of the wrong axis (C, or B*C)", """The mean is over axis 0, which has B
   elements: divide by B""")
def _(c):
    B, C = c.a.shape
    return {"da": [np.broadcast_to(c.dy / C, c.a.shape), np.broadcast_to(c.dy / (B * C), c.a.shape)]}


@m("no-dout", "1/B everywhere, without dout", NO_DY)
def _(c):
    return {"da": np.full(c.a.shape, 1 / c.a.shape[0])}


m = _catalogue("reshape_transpose")


@m("no-transpose", "only the reshape undone: dout.reshape(a.shape)", """The forward transposed, then reshaped.
   Going back undoes both in reverse order: reshape to [2, 4, 3] (the shape after the transpose), then
   transpose(0, 2, 1)""")
def _(c):
    return {"da": c.dy.reshape(c.a.shape)}


@m("wrong-order", "transposed before reshaping back, to the wrong intermediate shape", """Undo in reverse order:
   the reshape came last in the forward, so it is undone first (to [2, 4, 3]); then the transpose""")
def _(c):
    return {"da": [c.dy.reshape(2, 3, 4).transpose(0, 2, 1).reshape(c.a.shape)]}


m = _catalogue("getitem")


@m("no-add-at", "da[rows] += dout (or = dout): a repeated row keeps one gradient", """With fancy indexing, a
   row that appears twice in rows is written twice and the last write wins. np.add.at(da, rows, dout) adds
   every one""")
def _(c):
    last = np.zeros_like(c.a)
    last[c.rows] += c.dy
    return {"da": last}


@m("dout-shape", "dout returned as it is: shape [N, C], not a's [V, C]", """da must have a's shape: scatter the
   rows of dout back to the rows of a they came from""")
def _(c):
    return {"da": c.dy}


@m("counts", "counts of the rows (1 per pick) instead of dout", NO_DY)
def _(c):
    da = np.zeros_like(c.a)
    np.add.at(da, c.rows, 1.0)
    return {"da": da}


m = _catalogue("matmul")


@m("transposed", "a gradient transposed (b @ dout.T, or dout.T @ a)", """out[n, m] = sum_k a[n, k] b[k, m], so
   da[n, k] = sum_m dout[n, m] b[k, m] (da = dout @ b.T, shape of a) and db[k, m] = sum_n a[n, k] dout[n, m]
   (db = a.T @ dout, shape of b). The transposes give the same numbers in the wrong layout""")
def _(c):
    return {"da": c.b @ c.dy.T, "db": c.dy.T @ c.a}


@m("no-dout", "the local derivative (sums of the other matrix), without dout", NO_DY)
def _(c):
    return {"da": np.ones_like(c.dy) @ c.b.T, "db": c.a.T @ np.ones_like(c.dy)}


@m("elementwise", "an elementwise product where the math has a matrix product", """Each a[n, k] meets a whole
   row of b in out's row n: the sum over m makes it a matrix product, dout @ b.T""")
def _(c):
    return {"da": (c.dy.sum(axis=1, keepdims=True) * c.b.sum(axis=1)), "db": c.a.sum(axis=0)[:, None] * c.dy.sum(axis=0)}


m = _catalogue("mlp")


@m("weight-transposed", "a weight's gradient transposed: dW = dout^T x", """For y = x @ W + b with W [in, out],
   dW = x.T @ dy: shape [in, out] like W""")
def _(c):
    return {"W2": (c.h.T @ c.d["logits"]).T, "W1": (c.x.T @ c.d["h_pre"]).T}


@m("bias-not-summed", "a bias gradient not summed over the rows", """b is added to every one of the N rows:
   db = dy.sum(axis=0)""")
def _(c):
    return {"b2": [c.d["logits"], c.d["logits"].mean(axis=0)], "b1": [c.d["h_pre"], c.d["h_pre"].mean(axis=0)]}


@m("tanh-not-squared", "tanh's backward with 1 - h where the derivative is 1 - h^2", """d tanh(z)/dz =
   1 - tanh(z)^2, and tanh(h_pre) is the forward's h, so dh_pre = dh * (1 - h**2): the square matters""")
def _(c):
    return {"h_pre": c.d["h"] * (1 - c.h)}


@m("tanh-uses-pre", "tanh's backward with 1 - h_pre^2: the input where the output belongs", """d tanh(z)/dz =
   1 - tanh(z)^2, and tanh(h_pre) is h: the derivative is written with the output, 1 - h**2, not the input""")
def _(c):
    return {"h_pre": c.d["h"] * (1 - c.h_pre**2)}


@m("tanh-no-upstream", "tanh's local derivative 1 - h^2 alone, not multiplied by dh", NO_DY)
def _(c):
    return {"h_pre": 1 - c.h**2}


@m("tanh-skipped", "dh_pre = dh: the tanh's derivative is missing", """h = tanh(h_pre) is a step of its own:
   dh_pre = dh * (1 - h^2)""")
def _(c):
    return {"h_pre": c.d["h"]}


def _mlp_steps(c) -> dict:
    """The warm-ups the MLP is made of, each with its inputs, the learner's gradient flowing into
    it, and where its gradients go."""
    d = c.d
    return {"tanh": ("tanh", {"a": c.h_pre}, d["h"], {"da": "h_pre"}),
            "h @ W2": ("matmul", {"a": c.h, "b": c.W2}, d["logits"], {"da": "h", "db": "W2"}),
            "+ b2": ("add", {"a": c.h @ c.W2, "b": c.b2}, d["logits"], {"db": "b2"}),
            "x @ W1": ("matmul", {"a": c.x, "b": c.W1}, d["h_pre"], {"da": "x", "db": "W1"}),
            "+ b1": ("add", {"a": c.x @ c.W1, "b": c.b1}, d["h_pre"], {"db": "b1"})}


def _from_warmup(step: str, warmup_mistake):
    def wrong(c):
        name, inputs, dy, into = _mlp_steps(c)[step]
        ctx = CATALOGUES[name].context(inputs, dy)
        return {into[g]: v for g, v in warmup_mistake.wrong(ctx).items() if g in into}
    return wrong


for _step in ("tanh", "h @ W2", "+ b2", "x @ W1", "+ b1"):
    for _m in list(CATALOGUES[{"tanh": "tanh", "+ b2": "add", "+ b1": "add"}.get(_step, "matmul")].MISTAKES):
        CATALOGUES["mlp"].MISTAKES.append(type(_m)(f"{_step}:{_m.key}", f"in the step {_step}: {_m.title}", _m.lesson,
                                                   _from_warmup(_step, _m)))
