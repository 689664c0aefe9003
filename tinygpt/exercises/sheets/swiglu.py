"""Exercise: the backward pass of the SwiGLU feed-forward (Llama, Qwen, SmolLM2, Mistral).

Forward (weights as nn.Linear stores them, [out, in]: a layer is x @ W.T), with the
intermediates named:
    gate = x @ W_gate.T                 [B, T, C] -> [B, T, HID]
    up   = x @ W_up.T                   [B, T, C] -> [B, T, HID]
    act  = silu(gate) = gate * sigmoid(gate)
    h    = act * up                     the gated product
    y    = h @ W_down.T                 [B, T, HID] -> [B, T, C]

silu's derivative: with s = sigmoid(g), ds/dg = s (1 - s), so
    d silu / dg = s + g s (1 - s) = s (1 + g (1 - s)).

Shapes in the check: B = 2, T = 3, C = 5, HID = 7; W_gate and W_up [HID, C], W_down [C, HID].

Your task: write backward(dy, cache) returning (dx, dW_gate, dW_up, dW_down), the
gradients of the loss L given dy = dL/dy. Go back one line at a time (dh, then dact and
dup, then dgate); x feeds two lines, so dx is the sum of what comes back through both.

Check it with:  tinygpt exercise check swiglu swiglu.py
"""
import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def forward(x, W_gate, W_up, W_down):
    gate = x @ W_gate.T
    up = x @ W_up.T
    act = gate * sigmoid(gate)
    h = act * up
    y = h @ W_down.T
    cache = dict(x=x, W_gate=W_gate, W_up=W_up, W_down=W_down, gate=gate, up=up, act=act, h=h)
    return y, cache


def backward(dy, cache):
    """dy: dL/dy [B, T, C] -> (dx [B, T, C], dW_gate [HID, C], dW_up [HID, C], dW_down [C, HID])."""
    c = cache
    raise NotImplementedError("write dx, dW_gate, dW_up and dW_down, then return them")


if __name__ == "__main__":  # `python swiglu.py` checks this file
    from tinygpt.exercises import check_main

    raise SystemExit(check_main("swiglu", __file__))
