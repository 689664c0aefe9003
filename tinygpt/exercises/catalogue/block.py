"""Known mistakes in the block backward, each one step of it.

A step's mistake is computed from the gradients flowing into that step as the learner has
them (context.d), so a mistake is recognised even when an earlier step is wrong too. The
steps themselves are in block_flow.py; the single-op catalogues explain each op in depth."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises import answers
from tinygpt.exercises.block_flow import heads, layer_norm_back, merge, rows
from tinygpt.exercises.catalogue import Context, recorder
from tinygpt.exercises.catalogue.gelu import A
from tinygpt.exercises.sheets import block as sheet

MISTAKES: list = []
mistake = recorder(MISTAKES)
LINEARS = (("ff_out", "act", "W_2"), ("h", "ln2", "W_1"), ("att_out", "ctx", "W_o"))  # output, input, weight
PROJECTIONS = ("q", "k", "v")


def context(inputs, dout) -> Context:
    _, cache = sheet.forward(inputs["x"], inputs["p"])
    H = sheet.N_HEADS
    return Context(**{k: v for k, v in cache.items()}, dy=np.asarray(dout), H=H, D=inputs["x"].shape[-1] // H,
                   future=np.triu(np.ones((cache["att"].shape[-1],) * 2, dtype=bool), k=1))


def gelu_local(h, three=3.0, dt=None, first=True):
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (h + A * h**3))
    dt = 1 - t**2 if dt is None else dt(t)
    return (0.5 * (1 + t) if first else 0) + 0.5 * h * dt * c * (1 + three * A * h**2)


def softmax_back(c, dS_of):
    return dS_of(c.d["att"], c.att)


def qk(c, dS, scale=None):
    scale = 1 / np.sqrt(c.D) if scale is None else scale
    return {"q": dS @ c.k * scale, "k": dS.swapaxes(-1, -2) @ c.q * scale}


@mistake("weight-transposed", "a weight's gradient transposed: x^T dy where W is stored [out, in]",
         """For y = x @ W.T + b, dW[o, i] = sum over rows of dy[n, o] x[n, i]: dW = dy_rows.T @ x_rows, shape
         [out, in] like W. The square C x C weights (W_q, W_k, W_v, W_o) take the transpose without a shape error""")
def _(c):
    out = {w: (rows(c.d[y]).T @ rows(getattr(c, x))).T for y, x, w in LINEARS}
    out.update({f"W_{n}": (rows(merge(c.d[n])).T @ rows(c.ln1)).T for n in PROJECTIONS})
    return out


@mistake("input-weight-transposed", "an input's gradient through W.T where the math has W (dy @ W.T)",
         """y = x @ W.T gives dx = dy @ W: the transpose of the forward's W.T. With square weights dy @ W.T has
         the right shape and the wrong numbers""")
def _(c):
    ln1 = sum(merge(c.d[n]) @ c.p[f"W_{n}"].T for n in PROJECTIONS)
    return {"ctx": c.d["att_out"] @ c.p["W_o"].T, "ln1": ln1}


@mistake("bias-some-axes", "a bias gradient summed over only one of the axes B and T",
         """A bias [n] is added at every (b, t) position, so its gradient sums dy over both axes (0, 1)""")
def _(c):
    return {f"b_{w[-1]}": [c.d[y].sum(axis=0), c.d[y].sum(axis=1)] for y, _, w in LINEARS}


@mistake("bias-mean", "a bias gradient averaged over the positions instead of summed",
         """Every position's use of the bias adds to the loss; their gradients add: dy.sum(axis=(0, 1))""")
def _(c):
    return {f"b_{w[-1]}": c.d[y].mean(axis=(0, 1)) for y, _, w in LINEARS}


@mistake("gelu-no-3", "GELU's derivative without the 3 of d(0.044715 h^3)/dh = 3 * 0.044715 h^2",
         """u = sqrt(2/pi)(h + 0.044715 h^3) has du/dh = sqrt(2/pi)(1 + 3 * 0.044715 h^2): the exponent 3 comes down""")
def _(c):
    return {"h": c.d["act"] * gelu_local(c.h, three=1.0)}


@mistake("gelu-no-first-term", "GELU's derivative without 0.5 (1 + tanh(u)), the product rule's first term",
         """act = 0.5 h (1 + t): h is in both factors; differentiating the h in front gives 0.5 (1 + t)""")
def _(c):
    return {"h": c.d["act"] * gelu_local(c.h, first=False)}


@mistake("gelu-one-minus-t", "GELU's derivative with 1 - tanh(u) where d tanh/du = 1 - tanh(u)^2",
         """The derivative of tanh is 1 - tanh^2 (= sech^2): the square is part of it""")
def _(c):
    return {"h": c.d["act"] * gelu_local(c.h, dt=lambda t: 1 - t)}


@mistake("gelu-no-upstream", "GELU's local derivative alone, not multiplied by the gradient of act",
         """dL/dh = dL/dact * dact/dh, element by element: the chain rule multiplies by what flows in""")
def _(c):
    return {"h": gelu_local(c.h)}


@mistake("residual-missing", "a residual path is missing: x1 (or x) gets only the gradient through its layer norm",
         """out = x1 + ff_out uses x1 directly as well as through ln2 (and x1 = x + att_out uses x directly as well
         as through ln1). A value used twice gets the sum of both gradients: the residual adds dout (or dx1)""")
def _(c):
    return {"x1": layer_norm_back(c, 2, c.d["ln2"])[0], "x": layer_norm_back(c, 1, c.d["ln1"])[0]}


@mistake("norm-path-missing", "the layer-norm path is missing: x1 (or x) gets only the residual's gradient",
         """x1 feeds both the residual out = x1 + ff_out and ln2 = layer_norm(x1); its gradient is the sum of
         both. The residual alone gives dout; the path through ln2 adds the layer norm's backward of dln2""")
def _(c):
    return {"x1": c.d["out"], "x": c.d["x1"]}


@mistake("ln1-one-use", "ln1's gradient from one or two of its three uses (q, k, v), not all three",
         """ln1 feeds three projections, q = ln1 W_q^T, k = ln1 W_k^T and v = ln1 W_v^T. Its gradient is the sum of
         the three: dln1 = merge(dq) W_q + merge(dk) W_k + merge(dv) W_v. A loop that assigns dln1 = ... each
         time keeps only the last""")
def _(c):
    parts = {n: merge(c.d[n]) @ c.p[f"W_{n}"] for n in PROJECTIONS}
    return {"ln1": list(parts.values()) + [parts[a] + parts[b] for a, b in (("q", "k"), ("q", "v"), ("k", "v"))]}


@mistake("heads-no-transpose", "the heads split back without the transpose: dctx.reshape(B, H, T, D)",
         """The forward merged the heads with .transpose(0, 2, 1, 3).reshape(B, T, C): [B, H, T, D] -> [B, T, H, D]
         -> [B, T, C]. Undoing it is the inverse in reverse order: reshape to [B, T, H, D], then transpose
         back. A reshape alone scrambles positions and heads""")
def _(c):
    B, T, C = c.d["ctx"].shape
    scrambled = c.d["ctx"].reshape(B, c.H, T, c.D)
    return {"att": scrambled @ c.v.swapaxes(-1, -2), "v": c.att.swapaxes(-1, -2) @ scrambled}


@mistake("merge-no-transpose", "q, k or v merged back without the transpose: dq.reshape(B, T, C)",
         """q = (ln1 @ W_q.T).reshape(B, T, H, D).transpose(0, 2, 1, 3). Going back: transpose(0, 2, 1, 3) first,
         then reshape(B, T, C). Reshaping [B, H, T, D] directly mixes heads and positions""")
def _(c):
    B, H, T, D = c.d["q"].shape
    flat = {n: c.d[n].reshape(B, T, H * D) for n in PROJECTIONS}
    out = {f"W_{n}": rows(flat[n]).T @ rows(c.ln1) for n in PROJECTIONS}
    out["ln1"] = sum(flat[n] @ c.p[f"W_{n}"] for n in PROJECTIONS)
    return out


@mistake("datt-transposed", "datt = v @ dheads^T, the transpose of dheads @ v^T",
         """ctx = att @ v: att[i, j] multiplies v_j into row i, so datt[i, j] = dctx_i . v_j, which is
         dheads @ v^T. v @ dheads^T has the key index first""")
def _(c):
    return {"att": c.v @ heads(c.d["ctx"], c).swapaxes(-1, -2)}


@mistake("v-att-not-transposed", "dv = att @ dheads: att is not transposed",
         """ctx = att @ v: value j is used by every query i with weight att[i, j], so dv = att^T @ dheads""")
def _(c):
    return {"v": c.att @ heads(c.d["ctx"], c)}


@mistake("softmax-no-P", "the softmax backward without the factor att: datt - sum(datt * att)",
         """dscores_j = att_j (datt_j - sum_i datt_i att_i): both terms of the Jacobian att_i (delta_ij - att_j)
         carry att_j, which is also what keeps masked positions at 0""")
def _(c):
    return {"scores": c.d["att"] - (c.d["att"] * c.att).sum(axis=-1, keepdims=True)}


@mistake("softmax-skipped", "the softmax's backward skipped: dscores = datt",
         """att = softmax(masked scores) is a step of its own: dscores = att * (datt - sum(datt * att)).
         Passing datt straight through treats the softmax as the identity""")
def _(c):
    return {"scores": c.d["att"]}


@mistake("att-out-from-dout", "att_out given dout, the gradient of out, instead of the gradient of x1",
         """att_out feeds x1 = x + att_out, so its gradient is x1's, and x1's gradient collects dout from the
         residual AND the path through ln2. dout alone misses the feed-forward branch""")
def _(c):
    return {"att_out": c.d["out"]}


@mistake("softmax-no-sum-term", "the softmax backward without - att * sum(datt * att)",
         """Every att_i of a row shares the denominator, so dscores needs the term - att_j sum_i datt_i att_i""")
def _(c):
    return {"scores": c.att * c.d["att"]}


@mistake("softmax-wrong-axis", "the softmax backward's sum over the query axis (-2), not over the keys (-1)",
         """The softmax normalises each row over the keys, axis -1: its backward sums over that axis""")
def _(c):
    return {"scores": [c.att * (c.d["att"] - (c.d["att"] * c.att).sum(axis=axis, keepdims=True)) for axis in (-2, 1, (-2, -1))]}


@mistake("masked-gets-gradient", "gradient at the masked positions of scores (a key after its query)",
         """The masked scores were replaced by -inf before the softmax: what they were does not matter, so
         their gradient is 0 (and att = 0 there makes att * (...) zero by itself)""")
def _(c):
    good = answers.softmax(c.d["att"], (c.att,))
    return {"scores": np.where(c.future, c.d["att"], good)}


@mistake("no-scale", "the 1/sqrt(D) of scores = q k^T / sqrt(D) is missing (or applied twice, or inverted)",
         """The forward divides the scores by sqrt(D), so dq and dk carry that same factor 1/sqrt(D) once""")
def _(c):
    return {g: [v for s in (1.0, 1 / c.D, np.sqrt(c.D)) for v in [qk(c, c.d["scores"], s)[g]]] for g in ("q", "k")}


@mistake("scale-of-C", "scaled by 1/sqrt(C), the model width, where the forward divides by sqrt(D), the head size",
         """Each head computes its own scores from q and k of size D = C / H, and the forward divides them by
         sqrt(D): dq and dk carry that 1/sqrt(D), not 1/sqrt(C)""")
def _(c):
    width = c.D * c.H
    return {g: [qk(c, c.d["scores"], s)[g] for s in (1 / np.sqrt(width), np.sqrt(c.D) / width)] for g in ("q", "k")}


@mistake("k-not-transposed", "dk = dscores @ q: dscores is not transposed",
         """scores[i, j] = q_i . k_j / sqrt(D): key j is in column j, so dk_j = sum_i dscores[i, j] q_i / sqrt(D):
         dk = dscores^T @ q / sqrt(D)""")
def _(c):
    return {"k": c.d["scores"] @ c.q / np.sqrt(c.D)}


@mistake("ln-param-some-axes", "a layer norm's scale or shift gradient summed over only one of B and T",
         """scale and shift [C] are used at every (b, t): their gradients sum over both axes (0, 1)""")
def _(c):
    out = {}
    for i, (x, dln) in ((1, (c.x, "ln1")), (2, (c.x1, "ln2"))):
        xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + sheet.EPS)
        out[f"scale{i}"] = [(c.d[dln] * xhat).sum(axis=a) for a in (0, 1)]
        out[f"shift{i}"] = [c.d[dln].sum(axis=a) for a in (0, 1)]
    return out


@mistake("ln-scale-uses-x", "a layer norm's dscale computed with its input where xhat belongs",
         """y = xhat * scale + shift: dscale = sum of dy * xhat, the normalised value (recompute it from the
         cache's x and x1, or save it)""")
def _(c):
    return {"scale1": (c.d["ln1"] * c.x).sum(axis=(0, 1)), "scale2": (c.d["ln2"] * c.x1).sum(axis=(0, 1))}


@mistake("ln-no-rstd-path", "a layer norm's dx without the path through rstd",
         """The variance depends on every x of the row: that path adds - rstd * xhat * mean(dxhat * xhat)""")
def _(c):
    out = {}
    for i, (x, dln, res) in ((1, (c.x, "ln1", "x1")), (2, (c.x1, "ln2", "out"))):
        dxhat = c.d[dln] * c.p[f"scale{i}"]
        rstd = 1 / np.sqrt(x.var(-1, keepdims=True) + sheet.EPS)
        out["x" if i == 1 else "x1"] = c.d[res] + rstd * (dxhat - dxhat.mean(-1, keepdims=True))
    return out


@mistake("ln-no-scale", "a layer norm's dx computed from dy where dxhat = dy * scale belongs",
         """y = xhat * scale + shift: what reaches xhat is dy * scale, and dx is built from it""")
def _(c):
    ones = {f"scale{i}": np.ones_like(c.p[f"scale{i}"]) for i in (1, 2)}
    p = {**c.p, **ones}
    plain = Context(**{**vars(c), "p": p})
    return {"x1": c.d["out"] + layer_norm_back(plain, 2, c.d["ln2"])[0], "x": c.d["x1"] + layer_norm_back(plain, 1, c.d["ln1"])[0]}


# ------------------------------------------------------------------ the single-op catalogues, as steps of the block


def _step_contexts(c) -> dict:
    """For each op of the block, the single-op exercise's context built from the block's values,
    with the learner's gradient flowing into that step as its dy, and where its gradients go."""
    from tinygpt.exercises.catalogue import gelu, layer_norm, linear, softmax

    p, d = c.p, c.d
    steps = {"gelu": (gelu, {"x": c.h}, d["act"], {"dx": "h"}, None),
             "softmax": (softmax, {"x": c.scores}, d["att"], {"dx": "scores"}, None)}
    for i, x, dy, into, res in ((1, c.x, d["ln1"], "x", d["x1"]), (2, c.x1, d["ln2"], "x1", d["out"])):
        steps[f"layer_norm{i}"] = (layer_norm, {"x": x, "scale": p[f"scale{i}"], "shift": p[f"shift{i}"]}, dy,
                                   {"dx": into, "dscale": f"scale{i}", "dshift": f"shift{i}"}, res)
    for y, x, w in LINEARS:
        steps[w] = (linear, {"x": getattr(c, x), "W": p[w], "b": p[f"b_{w[-1]}"]}, d[y], {"dx": x, "dW": w, "db": f"b_{w[-1]}"}, None)
    return steps


def _from_op(step: str, op_mistake):
    def wrong(c):
        module, inputs, dy, into, residual = _step_contexts(c)[step]
        ctx = module.context(inputs, dy)
        if module.__name__.endswith("softmax"):
            ctx.y = c.att  # the masked softmax the block ran
            ctx.s = (dy * c.att).sum(axis=-1, keepdims=True)
        out = {}
        for grad, values in op_mistake.wrong(ctx).items():
            values = values if isinstance(values, list) else [values]
            add = residual if grad == "dx" and residual is not None else 0
            out[into[grad]] = [v + add for v in values]
        return out
    return wrong


STEP_LINES = {"gelu": "act = gelu(h)", "softmax": "att = softmax(scores)", "layer_norm1": "ln1 = layer_norm(x)",
              "layer_norm2": "ln2 = layer_norm(x1)", "W_2": "ff_out = act @ W_2.T + b_2", "W_1": "h = ln2 @ W_1.T + b_1",
              "W_o": "att_out = ctx @ W_o.T + b_o"}
for _step, _module in (("gelu", "gelu"), ("softmax", "softmax"), ("layer_norm1", "layer_norm"), ("layer_norm2", "layer_norm"),
                       ("W_2", "linear"), ("W_1", "linear"), ("W_o", "linear")):
    for _m in __import__(f"tinygpt.exercises.catalogue.{_module}", fromlist=["MISTAKES"]).MISTAKES:
        MISTAKES.append(type(_m)(f"{_step}:{_m.key}", f"in the step {STEP_LINES[_step]}: {_m.title}", _m.lesson,
                                 _from_op(_step, _m)))
