"""Cached decoding of GPTModel, one new token per row, on arrays: model.py's forward for the
case generate() repeats for every token, without the Tensor and Module layers.

Why a second route: at batch 1 a decoding step reads every weight once (494 MB for GPT-2 124M)
to produce one row of each product, so its limit is memory bandwidth (benchmarks/decode.py
times that limit: one gemv per weight matrix, about 17 ms on the 2-core test machine).
Through the modules the step also makes ~250 small op calls (module calls, dispatch, checks,
Tensor creation, the tiled attention kernel's bookkeeping): 5-7 ms more per token. Here a
block is two layer norms, six one-row products, one query's attention over the cache and a
GELU, each sequence's new position a row [B, C] throughout (no reshapes to [B, 1, C]).

Same math: the products, layer norms and GELU are the fast ops' NumPy steps in the same order,
so they give the same numbers; the attention of one query is the plain op's math
(functional/attention.py) for Tq = 1, which needs no mask (the new query comes after every
cached key) and no tiling (its scores are one row per head). The logits equal the module
path's to float rounding and greedy tokens are the same (tests/test_decode.py).

GPTModel.forward comes here only when nothing could tell the difference (`applies`).
TINYGPT_KERNELS=plain (or kernels "plain") runs every token through the modules.
"""
from __future__ import annotations

import math

import numpy as np

from tinygpt import backend, dispatch, nn, op_checks
from tinygpt.functional.activations import GELU_CUBIC, SQRT_2_OVER_PI
from tinygpt.graph_state import state
from tinygpt.kernels import module_of

# The modules gpt_step reproduces, a model's and each block's (in _made_of_nn_modules' order)
_MODEL = (nn.Embedding, nn.Embedding, nn.Dropout, nn.Sequential, nn.LayerNorm, nn.Linear)
_BLOCK = (nn.TransformerBlock, nn.LayerNorm, nn.MultiHeadAttention, nn.Linear, nn.Linear, nn.Linear, nn.Linear,
          nn.Dropout, nn.LayerNorm, nn.FeedForward, nn.Sequential, nn.Linear, nn.GELU, nn.Linear)


def applies(model, ids) -> bool:
    """Whether model(ids, cache) may run here (gpt_step): one new token per row, evaluation under no_grad,
    no trace, anomaly detector or module hook to see the modules run, the fast kernels on a CPU
    or CUDA device, and the model made of nn's own modules (a LoRA layer or any subclass may
    compute something else, so it goes through its modules)."""
    return (ids.shape[1] == 1 and not (model.training or state.grad_enabled or state.observers or nn.any_hooks())
            and dispatch.kernels_mode() == "fast" and model.tok_emb.weight.device in ("cpu", "cuda")
            and _made_of_nn_modules(model))


def _made_of_nn_modules(model) -> bool:
    """Every module is exactly the nn class gpt_step computes (about 10 us for GPT-2's 12 blocks)."""
    try:
        if (type(model.tok_emb), type(model.pos_emb), type(model.drop_emb), type(model.trf_blocks),
                type(model.final_norm), type(model.out_head)) != _MODEL:
            return False
        for block in model.trf_blocks:
            att, ff = block.att, block.ff
            if (type(block), type(block.norm1), type(att), type(att.W_query), type(att.W_key), type(att.W_value),
                    type(att.out_proj), type(block.drop_shortcut), type(block.norm2), type(ff), type(ff.layers),
                    *map(type, ff.layers)) != _BLOCK:
                return False
    except AttributeError:  # a block of another shape
        return False
    return True


def gpt_step(model, ids, cache):
    """Logits [B, 1, vocab] for token ids [B, 1] at the position after the cache's tokens, whose
    keys and values join the cache (GPTModel.forward with a cache, dropout off). Each sequence's
    one new position is a row: x is [B, C] throughout."""
    ids = backend.to_device(ids, model.tok_emb.weight.device)
    op_checks.embedding(ids, model.tok_emb.weight)  # an id out of range: the modules' one line, not NumPy's wrap-around
    x = model.tok_emb.weight.data[ids[:, 0]] + model.pos_emb.weight.data[cache.length]  # [B, C] + [C]
    for block, layer in zip(model.trf_blocks, cache.layers):
        x = x + _attention(block.att, _layer_norm(block.norm1, x), layer)  # x + drop_shortcut(att(norm1(x)))
        up, _, down = block.ff.layers
        x = x + _linear(down, _gelu(_linear(up, _layer_norm(block.norm2, x))))  # x + ff(norm2(x))
    return _linear(model.out_head, _layer_norm(model.final_norm, x))[:, None, :]  # [B, V] -> [B, 1, V]


def _linear(linear: nn.Linear, x):
    """x W^T + b for rows x [B, in]: one BLAS call, as fused.Linear makes it for a few rows."""
    y = x @ linear.weight.data.T
    if linear.bias is not None:
        y += linear.bias.data
    return y


def _attention(att: nn.MultiHeadAttention, x, layer: nn.LayerCache):
    """att(x, layer) for one query per row: the new key and value are written into the cache,
    and the query attends to every cached position (all of them come before it: no mask)."""
    b, c = x.shape
    q = _linear(att.W_query, x).reshape(b, att.num_heads, 1, att.head_dim)  # [B, H*D] -> [B, H, 1, D]
    k, v = layer.write(_linear(att.W_key, x).reshape(q.shape), _linear(att.W_value, x).reshape(q.shape))  # [B, H, T, D]
    scores = q @ k.swapaxes(-1, -2)  # [B, H, 1, D] @ [B, H, D, T] -> [B, H, 1, T]
    scores *= 1.0 / math.sqrt(att.head_dim)
    scores -= scores.max(axis=-1, keepdims=True)  # softmax over the keys, in place
    weights = backend.backend_of(scores).exp(scores, out=scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return _linear(att.out_proj, (weights @ v).reshape(b, c))  # [B, H, 1, T] @ [B, H, T, D]; heads joined: [B, H*D]


# Layer norm and GELU of a step's few rows. On CUDA: the device's fused kernels. On the CPU:
# the NumPy steps of kernels/cpu.py's layer_norm_forward and gelu_forward in the same order
# (so the same numbers; a mean is a sum divided by the count, as np.mean computes it), on all
# rows at once: those kernels split rows into blocks for the thread pool and keep xhat and rstd
# for backward, 21 and 12 us a call for one row of GPT-2, against 11 and 7 here (25 layer
# norms and 12 GELUs a token).

def _layer_norm(norm: nn.LayerNorm, x):
    if not isinstance(x, np.ndarray):
        return module_of(backend.device_of(x)).layer_norm_forward(x, norm.scale.data, norm.shift.data, norm.eps)[0]
    c = x.shape[-1]
    y = x - np.add.reduce(x, axis=-1, keepdims=True) / c
    var = np.add.reduce(y * y, axis=-1, keepdims=True) / c
    y *= 1.0 / np.sqrt(var + norm.eps)  # (x - mean) / sqrt(var + eps)
    y *= norm.scale.data
    y += norm.shift.data
    return y


def _gelu(x):
    if not isinstance(x, np.ndarray):
        return module_of(backend.device_of(x)).gelu_forward(x)
    y = x * x  # 0.5 x (1 + tanh(SQRT_2_OVER_PI x (1 + GELU_CUBIC x^2)))
    y *= GELU_CUBIC
    y += 1.0
    y *= x
    y *= SQRT_2_OVER_PI
    np.tanh(y, out=y)
    y += 1.0
    y *= x
    y *= 0.5
    return y
