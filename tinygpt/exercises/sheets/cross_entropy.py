"""Exercise: the backward pass of the cross-entropy loss.

Forward, for N rows of V logits z and integer targets t:
    loss_r = -log softmax(z_r)[t_r] = logsumexp(z_r) - z_r[t_r]
    loss   = (1/N) sum_r loss_r            (the mean over rows)

Shapes: logits [N, V], targets [N] integers in 0..V-1, loss a scalar
with N = 6, V = 5 in the check.

Your task: write backward(dloss, cache) returning dlogits, the gradient of the final
loss L with respect to the logits, given dloss = dL/dloss (a number: the loss may be
scaled later, so do not assume it is 1).

Check it with:  tinygpt exercise check cross_entropy cross_entropy.py
"""
import numpy as np


def forward(logits, targets):
    m = logits.max(axis=1, keepdims=True)
    logsumexp = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))   # [N]
    rows = np.arange(len(targets))
    loss = (logsumexp - logits[rows, targets]).mean()              # scalar
    cache = (logits, targets, logsumexp)
    return loss, cache


def backward(dloss, cache):
    """dloss: dL/dloss (a scalar) -> dlogits [N, V]."""
    logits, targets, logsumexp = cache
    raise NotImplementedError("write dlogits, then return it")


if __name__ == "__main__":  # `python cross_entropy.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("cross_entropy", __file__))
