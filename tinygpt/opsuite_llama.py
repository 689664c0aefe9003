"""Gradient-check cases of the Llama family's ops (rms_norm, rope, silu, grouped-query
attention, and the SwiGLU and QK-norm compositions), registered into opsuite's one list.

Each build returns (fn, inputs, torch_ref): torch_ref(torch, *tensors) computes the same thing
with PyTorch from the same inputs, by its own route where one exists (rope as a complex
rotation, attention through torch's scaled_dot_product_attention with enable_gqa), for the
parity tests.
"""
from __future__ import annotations

import numpy as np

import tinygpt.functional as F
from tinygpt.functional.rope import rope_frequencies
from tinygpt.opcase import case

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8}


@case("rms_norm", max_examples=100, examples=[{"shape": (2, 3, 5), "offset": False}, {"shape": (4, 1), "offset": True}])
def rms_norm(pick):
    shape, offset = pick.shape(1, 3, name="shape"), pick.booleans(name="offset")

    def torch_ref(torch, x, weight):
        return torch.nn.functional.rms_norm(x, x.shape[-1:], 1 + weight if offset else weight, eps=1e-6)
    return (lambda x, weight: F.rms_norm(x, weight, 1e-6, offset=offset)), pick.leaves(shape, shape[-1:]), torch_ref


def _torch_rope(torch, x, positions, theta, scaling):
    """RoPE as a complex product: pair (x1_i, x2_i) is the number x1 + i x2, turned by exp(i a_i)."""
    d = x.shape[-1]
    frequencies = torch.as_tensor(np.asarray(rope_frequencies(np, d, theta, scaling, np.float64)), dtype=x.dtype)
    angles = torch.as_tensor(positions, dtype=x.dtype)[..., None] * frequencies  # [.., T, D/2]
    if angles.ndim == 3:
        angles = angles[:, None]
    turned = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([turned.real, turned.imag], dim=-1)


@case("rope", max_examples=100, examples=[
    {"lead": (2, 3), "t": 4, "half": 3, "start": 5, "per_row": False, "scaled": False},  # odd number of pairs
    {"lead": (2, 1), "t": 3, "half": 2, "start": 0, "per_row": True, "scaled": True}])
def rope(pick):
    """x (B, H, T, D) with D even (the op pairs halves), positions starting past 0 as behind a
    KV cache, or one row of positions per sequence (left padding); llama3 scaling with an
    original context of 8, so that the slow, medium and fast frequencies all occur."""
    lead, t, half = pick.shape(2, 2, name="lead"), pick.dim("t"), pick.dim("half", high=3)
    start, per_row = pick.sampled_from((0, 5, 1000), name="start"), pick.booleans(name="per_row")
    scaling = LLAMA3_SCALING if pick.booleans(name="scaled") else None
    positions = start + np.arange(t)
    if per_row:
        positions = positions + pick.ids(4, (lead[0], 1))
    theta = 10000.0
    return ((lambda x: F.rope(x, positions, theta, scaling)), pick.leaves(lead + (t, 2 * half)),
            lambda torch, x: _torch_rope(torch, x, positions, theta, scaling))


@case("silu", max_examples=60, examples=[{"shape": (3, 7)}])
def silu(pick):
    x = pick.leaf(pick.shape(name="shape"))
    x.data *= 4  # reach the tails, where the sigmoid saturates
    return F.silu, [x], lambda torch, x: torch.nn.functional.silu(x)


@case("repeat_heads", max_examples=50, examples=[{"lead": (2,), "kv_heads": 2, "repeats": 3, "t": 2, "d": 3}])
def repeat_heads(pick):
    lead, kv_heads, repeats = pick.shape(1, 2, name="lead"), pick.dim("kv_heads", high=3), pick.dim("repeats", high=3)
    x = pick.leaf(lead + (kv_heads, pick.dim("t"), pick.dim("d")))
    return ((lambda x: F.repeat_heads(x, repeats)), [x],
            lambda torch, x: torch.repeat_interleave(x, repeats, dim=-3))


def _torch_attention(torch, q, k, v, causal):
    """torch's attention with GQA; its is_causal aligns the mask to the first keys, ours to the last."""
    tq, tk = q.shape[-2], k.shape[-2]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq) if causal else None
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _gqa_attention(pick, dropout_p: float):
    """q (B, H, Tq, D) against k, v (B, H_kv, Tk, D) with H = group * H_kv; D odd is allowed here.
    The op reads each kv head for its group in place (no repeat_heads before it)."""
    batch, kv_heads, group = pick.dim("batch", high=2), pick.dim("kv_heads", high=2), pick.dim("group", high=3)
    causal, tk = pick.booleans(name="causal"), pick.dim("tk", high=4)
    tq, d, dv = pick.dim("tq", high=tk if causal else 3), pick.dim("d", high=3), pick.dim("dv", high=3)
    heads = kv_heads * group
    inputs = pick.leaves((batch, heads, tq, d), (batch, kv_heads, tk, d), (batch, kv_heads, tk, dv))
    reference = (lambda torch, q, k, v: _torch_attention(torch, q, k, v, causal)) if dropout_p == 0.0 else None
    return ((lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p)), inputs,
            reference)


@case("gqa_attention", max_examples=75, examples=[
    {"batch": 2, "kv_heads": 1, "group": 3, "tk": 4, "tq": 4, "d": 3, "dv": 2, "causal": True},  # one kv head
    {"batch": 1, "kv_heads": 2, "group": 2, "tk": 4, "tq": 2, "d": 3, "dv": 3, "causal": True},  # queries behind a cache
    {"batch": 2, "kv_heads": 2, "group": 1, "tk": 3, "tq": 3, "d": 2, "dv": 3, "causal": True},  # H_kv == H
    {"batch": 1, "kv_heads": 1, "group": 2, "tk": 3, "tq": 4, "d": 3, "dv": 2, "causal": False}])
def gqa_attention(pick):
    return _gqa_attention(pick, dropout_p=0.0)


@case("gqa_attention_dropout", max_examples=40, examples=[
    {"batch": 1, "kv_heads": 1, "group": 3, "tk": 4, "tq": 4, "d": 2, "dv": 2, "causal": True},
    {"batch": 2, "kv_heads": 2, "group": 2, "tk": 3, "tq": 2, "d": 3, "dv": 2, "causal": True}])
def gqa_attention_dropout(pick):
    """Dropout on a group's weights: each query head draws its own part of the mask."""
    return _gqa_attention(pick, dropout_p=0.4)


@case("swiglu", max_examples=60, examples=[{"shape": (2, 5)}])
def swiglu(pick):
    shape = pick.shape(name="shape")
    gate, up = pick.leaves(shape, shape)
    gate.data *= 4  # the sigmoid's tails too
    return F.swiglu, [gate, up], lambda torch, gate, up: torch.nn.functional.silu(gate) * up


@case("feed_forward", max_examples=50, examples=[{"lead": (2, 3), "channels": 3, "hidden": 4}])
def feed_forward(pick):
    """The Llama feed-forward, down(swiglu(gate(x), up(x))), composed from linear and swiglu."""
    lead, channels, hidden = pick.shape(1, 2, name="lead"), pick.dim("channels"), pick.dim("hidden")
    inputs = pick.leaves(lead + (channels,), (hidden, channels), (hidden, channels), (channels, hidden))

    def torch_ref(torch, x, w_gate, w_up, w_down):
        lin = torch.nn.functional.linear
        return lin(torch.nn.functional.silu(lin(x, w_gate)) * lin(x, w_up), w_down)
    return (lambda x, w_gate, w_up, w_down: F.linear(F.swiglu(F.linear(x, w_gate), F.linear(x, w_up)), w_down)), \
        inputs, torch_ref


@case("qk_norm_rope", max_examples=40, examples=[{"batch": 1, "kv_heads": 1, "group": 2, "t": 3, "half": 2}])
def qk_norm_rope(pick):
    """Qwen3's attention core: RMSNorm over each head's q and k (one weight of size D shared by
    the heads), then RoPE at positions 3.., then grouped-query attention."""
    batch, kv_heads, group = pick.dim("batch", high=2), pick.dim("kv_heads", high=2), pick.dim("group", high=2)
    t, d = pick.dim("t", high=3), 2 * pick.dim("half", high=2)
    heads, positions = kv_heads * group, 3 + np.arange(t)
    inputs = pick.leaves((batch, heads, t, d), (batch, kv_heads, t, d), (batch, kv_heads, t, d), (d,), (d,))

    def fn(q, k, v, q_weight, k_weight):
        q = F.rope(F.rms_norm(q, q_weight), positions)
        k = F.rope(F.rms_norm(k, k_weight), positions)
        return F.scaled_dot_product_attention(q, k, v)

    def torch_ref(torch, q, k, v, q_weight, k_weight):
        norm = torch.nn.functional.rms_norm
        q = _torch_rope(torch, norm(q, (d,), q_weight, eps=1e-6), positions, 10000.0, None)
        k = _torch_rope(torch, norm(k, (d,), k_weight, eps=1e-6), positions, 10000.0, None)
        return _torch_attention(torch, q, k, v, True)
    return fn, inputs, torch_ref
