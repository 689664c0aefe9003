"""Warm-up 13: backprop through a two-layer MLP, one intermediate at a time.

Forward (weights stored [in, out] here, so a layer is x @ W + b):
    h_pre  = x @ W1 + b1          [N, IN] @ [IN, HID] -> [N, HID]
    h      = tanh(h_pre)
    logits = h @ W2 + b2          [N, HID] @ [HID, OUT] -> [N, OUT]

Shapes in the check: N = 4, IN = 3, HID = 5, OUT = 2.

Your task, backprop-ninja style: write backward(dlogits, cache) returning a dict with the
gradient of the loss L for every name in GRADIENTS, given dlogits = dL/dlogits. Go back one
line at a time; each line's backward is one of the warm-ups you did (matmul, add with
broadcasting, tanh). The checker tells you which gradient is the first wrong one going
backward: fix it first, the ones computed from it may only inherit its error.

Check it with:  tinygpt exercise check mlp mlp.py
"""
import numpy as np

GRADIENTS = ("logits", "W2", "b2", "h", "h_pre", "W1", "b1", "x")


def forward(x, W1, b1, W2, b2):
    h_pre = x @ W1 + b1
    h = np.tanh(h_pre)
    logits = h @ W2 + b2
    cache = dict(x=x, W1=W1, b1=b1, W2=W2, b2=b2, h_pre=h_pre, h=h, logits=logits)
    return logits, cache


def backward(dlogits, cache):
    """dlogits: dL/dlogits [N, OUT] -> {name: dL/dname for every name in GRADIENTS}."""
    c = cache
    raise NotImplementedError("write the gradient of every name in GRADIENTS and return them in a dict")


if __name__ == "__main__":  # `python mlp.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("mlp", __file__))
