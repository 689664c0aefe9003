"""Exercise: backprop through a whole transformer block, one intermediate at a time.

This is GPT-2's pre-norm block (the book's TransformerBlock, without dropout):
    x1  = x  + attention(layer_norm1(x))
    out = x1 + feed_forward(layer_norm2(x1)),   feed_forward = linear, GELU, linear
The forward below is split into named intermediates. In the spirit of the "backprop
ninja" exercise of Karpathy's makemore series, you write the gradient of the loss with
respect to every one of them, going backward from out to x, and of every parameter.

Shapes (B = 5, T = 4, C = 6, H = 2 heads of D = 3, hidden 4C = 24 in the check):
    x, ln1, ctx, att_out, x1, ln2, ff_out, out    [B, T, C]
    q, k, v                                       [B, H, T, D]
    scores, att                                   [B, H, T, T]
    h, act                                        [B, T, 4C]
    W_q, W_k, W_v, W_o [C, C],  b_o [C],  W_1 [4C, C],  b_1 [4C],  W_2 [C, 4C],  b_2 [C]
    scale1, shift1, scale2, shift2 [C]
Linear weights are stored [out, in], so a linear layer is  y = x @ W.T + b.

Your task: write backward(dout, cache) returning a dict {name: dL/dname} for every name
in GRADIENTS, given dout = dL/dout. Two things to keep in mind:
  - a value used in several places (x, ln1, x1) gets the SUM of the gradients of its uses;
  - reshapes and transposes are undone by the inverse reshape or transpose.
You did layer_norm, softmax, gelu and linear as single exercises: here they are steps
(recompute what a step's backward needs, such as xhat and rstd, from the values in cache).
The checker tells you which gradient is the first wrong one going backward: fix that one
first, the ones after it may only inherit its error.

Check it with:  tinygpt exercise check block block.py
"""
import numpy as np

N_HEADS = 2
EPS = 1e-5
GRADIENTS = ("ff_out", "W_2", "b_2", "act", "h", "W_1", "b_1", "ln2", "scale2", "shift2", "x1",
             "att_out", "W_o", "b_o", "ctx", "att", "scores", "q", "k", "v", "W_q", "W_k", "W_v",
             "ln1", "scale1", "shift1", "x")


def layer_norm(x, scale, shift):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * scale + shift


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def forward(x, p):
    """x [B, T, C] and the parameters p (a dict) -> (out [B, T, C], cache)."""
    B, T, C = x.shape
    H, D = N_HEADS, C // N_HEADS
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # True where key j comes after query i

    ln1 = layer_norm(x, p["scale1"], p["shift1"])
    q = (ln1 @ p["W_q"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3)   # [B, T, C] -> [B, H, T, D]
    k = (ln1 @ p["W_k"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    v = (ln1 @ p["W_v"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(D)                        # [B, H, T, T]
    att = softmax(np.where(future, -np.inf, scores))                    # [B, H, T, T]
    ctx = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)              # [B, H, T, D] -> [B, T, C]
    att_out = ctx @ p["W_o"].T + p["b_o"]
    x1 = x + att_out
    ln2 = layer_norm(x1, p["scale2"], p["shift2"])
    h = ln2 @ p["W_1"].T + p["b_1"]                                     # [B, T, C] -> [B, T, 4C]
    act = gelu(h)
    ff_out = act @ p["W_2"].T + p["b_2"]                                # [B, T, 4C] -> [B, T, C]
    out = x1 + ff_out

    cache = dict(p=p, x=x, ln1=ln1, q=q, k=k, v=v, scores=scores, att=att, ctx=ctx, att_out=att_out,
                 x1=x1, ln2=ln2, h=h, act=act, ff_out=ff_out)
    return out, cache


def backward(dout, cache):
    """dout: dL/dout [B, T, C] -> {name: dL/dname for every name in GRADIENTS}."""
    c, p = cache, cache["p"]
    # Go back through forward one line at a time, from `out = x1 + ff_out` up to ln1.
    raise NotImplementedError("write the gradient of every name in GRADIENTS and return them in a dict")


if __name__ == "__main__":  # `python block.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("block", __file__))
