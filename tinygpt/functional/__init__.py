"""The fused operations a GPT is built from, each with a hand-derived backward.

Each op is a `Function` whose docstring states its forward in one line of math, then derives
its backward. The code under it is that math on whole arrays: the backward is computed in
closed form from a few saved arrays, and no op here builds a graph of smaller ops. Shapes use
B batch, T tokens, C channels, H heads, D head size, V vocabulary, N rows (all axes but the
last, flattened).

This plain math is the reference, and nothing else lives in these files. A faster version of
an op (blocked on every CPU core, or fused CUDA kernels) is a class of the same name in
tinygpt/kernels/fused.py, tested against the one here; `Function.apply` picks which runs
(dispatch.implementation). On the strict backend, or with TINYGPT_KERNELS=plain, it is always
the math below.

    linear.py        linear, embedding
    norms.py         layer_norm, rms_norm
    activations.py   gelu, softmax, log_softmax, silu, swiglu
    dropout.py       dropout
    attention.py     scaled_dot_product_attention (grouped-query too: k, v with fewer heads, each read by its group)
    gqa.py           repeat_heads: the group's sharing as an op of its own (the lesson), and its array steps
    flash_attention.py  flash_attention: the same attention in tiles, in O(T) memory (the lesson)
    rope.py          rope (rotary position embeddings)
    loss.py          cross_entropy
"""
from tinygpt.functional.activations import GELU, LogSoftmax, SiLU, Softmax, SwiGLU, gelu, log_softmax, silu, softmax, swiglu
from tinygpt.functional.attention import ScaledDotProductAttention, future_mask, scaled_dot_product_attention
from tinygpt.functional.dropout import Dropout, dropout
from tinygpt.functional.flash_attention import FlashAttention, flash_attention
from tinygpt.functional.gqa import RepeatHeads, repeat_heads
from tinygpt.functional.linear import Embedding, Linear, embedding, linear
from tinygpt.functional.loss import CrossEntropy, cross_entropy
from tinygpt.functional.norms import LayerNorm, RMSNorm, layer_norm, rms_norm
from tinygpt.functional.rope import Rope, rope

__all__ = ["Linear", "linear", "Embedding", "embedding", "LayerNorm", "layer_norm", "GELU", "gelu",
           "Softmax", "softmax", "LogSoftmax", "log_softmax", "Dropout", "dropout",
           "ScaledDotProductAttention", "scaled_dot_product_attention", "future_mask",
           "CrossEntropy", "cross_entropy",
           "RMSNorm", "rms_norm", "Rope", "rope", "SiLU", "silu", "SwiGLU", "swiglu", "RepeatHeads", "repeat_heads",
           "FlashAttention", "flash_attention"]
