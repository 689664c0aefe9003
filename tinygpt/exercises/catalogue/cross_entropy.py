"""Known mistakes in the cross-entropy backward.

The derivation: loss = (1/N) sum_r (logsumexp(z_r) - z_r[t_r]). d logsumexp(z_r)/dz_rj = softmax(z_r)_j
and d z_r[t_r]/dz_rj = 1 when j = t_r, so dlogits = (softmax(z) - onehot(t)) * dloss / N."""
from __future__ import annotations

import numpy as np

from tinygpt.exercises.catalogue import Context, recorder

MISTAKES: list = []
mistake = recorder(MISTAKES)


def context(inputs, dout) -> Context:
    z, t = inputs["logits"], inputs["targets"]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.zeros_like(z)
    onehot[np.arange(len(t)), t] = 1.0
    return Context(z=z, t=t, p=p, onehot=onehot, N=len(t), dloss=float(np.asarray(dout)), dy=np.asarray(dout))


@mistake("no-mean", "the 1/N of the mean is missing",
         """loss is the mean over the N rows, (1/N) sum_r loss_r, so each row's gradient carries 1/N:
         dlogits = (softmax - onehot) * dloss / N""")
def _(c):
    return {"dlogits": (c.p - c.onehot) * c.dloss}


@mistake("mean-twice", "divided by N twice (N^2)",
         """The mean brings one factor 1/N. A second division (a .mean() over rows after already dividing by N,
         or dloss taken as if it were already per row) makes it 1/N^2""")
def _(c):
    return {"dlogits": (c.p - c.onehot) * c.dloss / c.N**2}


@mistake("no-dloss", "dloss is missing: the upstream gradient of the loss",
         """backward gets dloss = dL/dloss (the loss may be scaled later, e.g. by a loss weight or gradient
         accumulation), and the chain rule multiplies by it: (softmax - onehot) * dloss / N""")
def _(c):
    return {"dlogits": [(c.p - c.onehot) / c.N, c.p - c.onehot]}


@mistake("no-one-hot", "the - onehot(target) term is missing: only the softmax",
         """loss_r = logsumexp(z_r) - z_r[t_r] has two parts. logsumexp gives softmax(z_r); the - z_r[t_r]
         gives -1 at the target entry, which is the one-hot. The target's gradient is p - 1, the others' p""")
def _(c):
    return {"dlogits": c.p * c.dloss / c.N}


@mistake("column-index", "p[:, targets] -= 1: whole columns changed, not one entry per row",
         """p[:, targets] selects every row of each target column, so it subtracts 1 from entries that are not
         targets. One entry per row is p[np.arange(N), targets]: row r, column targets[r]""")
def _(c):
    wrong = c.p.copy()
    wrong[:, c.t] -= 1
    counted = c.p.copy()
    for target in c.t:
        counted[:, target] -= 1
    return {"dlogits": [wrong * c.dloss / c.N, counted * c.dloss / c.N]}


@mistake("plus-one", "+ onehot where the math has - onehot",
         """loss_r = logsumexp(z_r) - z_r[t_r]: the target logit enters with a minus, so its derivative is -1,
         and the target entry is p - 1 (pushing the target's logit up lowers the loss)""")
def _(c):
    return {"dlogits": (c.p + c.onehot) * c.dloss / c.N}


@mistake("log-probs", "log-probabilities (log softmax) used where the probabilities belong",
         """d logsumexp(z)/dz_j = exp(z_j) / sum exp = softmax(z)_j: the probabilities themselves, not their logs""")
def _(c):
    return {"dlogits": (np.log(c.p) - c.onehot) * c.dloss / c.N}


@mistake("onehot-minus-p", "onehot - softmax: the sign of the whole gradient flipped",
         """The loss falls when the target's logit rises, so dloss/dz_target = p - 1 is negative: the gradient
         is softmax - onehot, not the other way round""")
def _(c):
    return {"dlogits": (c.onehot - c.p) * c.dloss / c.N}


@mistake("softmax-wrong-axis", "the softmax taken over the rows (axis 0) instead of over the classes",
         """Each row's loss normalises its own V logits: softmax over axis 1 (the classes), one distribution
         per sample""")
def _(c):
    p0 = np.exp(c.z - c.z.max(axis=0, keepdims=True))
    p0 /= p0.sum(axis=0, keepdims=True)
    return {"dlogits": (p0 - c.onehot) * c.dloss / c.N}


@mistake("logits-not-probs", "the logits used where softmax(logits) belongs",
         """The derivative of logsumexp(z) is softmax(z), not z: the logits must go through the softmax first""")
def _(c):
    return {"dlogits": (c.z - c.onehot) * c.dloss / c.N}


@mistake("only-target-term", "only the - onehot part: the logsumexp's gradient (the softmax) is missing",
         """Every logit is in logsumexp(z_r), so every entry of the row has a gradient, softmax(z_r)_j; the target
         entry has p - 1""")
def _(c):
    return {"dlogits": -c.onehot * c.dloss / c.N}


@mistake("dlogp", "the gradient by the probability (-1/p at the target), not by the logit",
         """-log p_t differentiated by p_t is -1/p_t, but the check asks for the logits' gradient: through the
         softmax that becomes p - onehot""")
def _(c):
    return {"dlogits": -c.onehot / c.p * c.dloss / c.N}


@mistake("unnormalised-exp", "exp(logits) used without dividing by the sum (not a softmax)",
         """d logsumexp(z)/dz_j = exp(z_j) / sum_k exp(z_k): the normaliser stays. (The cache holds logsumexp:
         exp(z - logsumexp) is the softmax.)""")
def _(c):
    return {"dlogits": [(np.exp(c.z) - c.onehot) * c.dloss / c.N, (np.exp(c.z - c.z.max(axis=1, keepdims=True)) - c.onehot) * c.dloss / c.N]}


@mistake("scale-on-one-term", "dloss / N applied to one of softmax and onehot only",
         """dlogits = (softmax - onehot) * dloss / N: both terms come from the same loss_r, which is scaled by
         dloss / N; the parentheses matter""")
def _(c):
    k = c.dloss / c.N
    return {"dlogits": [c.p * k - c.onehot, c.p - c.onehot * k]}


@mistake("mean-over-classes", "divided by V (the classes) or N*V instead of N",
         """The mean in the loss is over the N rows only; each row's loss is one number, not a mean over its V
         classes""")
def _(c):
    V = c.z.shape[1]
    return {"dlogits": [(c.p - c.onehot) * c.dloss / V, (c.p - c.onehot) * c.dloss / (c.N * V)]}
