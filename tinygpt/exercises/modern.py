"""The exercises on the newer decoder blocks (RMSNorm, RoPE, SwiGLU, grouped-query attention)
and on FlashAttention (the online softmax forward, the tiled backward).

Inputs are drawn as for the others (registry.py): every size distinct, no weight near 0 or
1, a random upstream gradient. Here also: RoPE's positions start after a KV cache (not at 0),
GQA has 2 key/value heads for 4 query heads, the flash exercises put the queries at the end
of a longer key sequence (causal with an offset), and the online softmax has rows of scores
near +700 and -800, where a missing or wrong max shift overflows."""
from __future__ import annotations

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.exercises import answers_modern
from tinygpt.exercises.registry import Exercise, _signed, differentiable, engine_grads, scales
from tinygpt.exercises.sheets import flash_backward as flash_sheet
from tinygpt.exercises.sheets import online_softmax as online_sheet
from tinygpt.exercises.sheets import rms_norm as rms_sheet
from tinygpt.exercises.sheets import rope as rope_sheet

ROPE_START = 7  # the tokens already in the KV cache: the new ones sit at positions 7, 8, ...


def _apart(rng, *shape):
    """Values of random sign with |v| in [0.2, 1.8], none within 0.1 of 1 (nor of 0)."""
    size = rng.uniform(0.2, 1.8, shape)
    size[np.abs(size - 1) < 0.1] += 0.2
    return size * rng.choice([-1.0, 1.0], shape)


def _op(name, difficulty, summary, dims, draw, op, **extra) -> Exercise:
    inputs, _ = draw(np.random.default_rng(0))
    return Exercise(name, difficulty, summary, dims, draw, engine_grads(op), getattr(answers_modern, name),
                    grads=tuple("d" + n for n in differentiable(inputs)), **extra)


def _swiglu_draw(rng):
    return ({"x": _signed(rng, 2, 3, 5), "W_gate": _signed(rng, 7, 5, low=0.2, high=0.9),
             "W_up": _signed(rng, 7, 5, low=0.2, high=0.9), "W_down": _signed(rng, 5, 7, low=0.2, high=0.9)},
            _signed(rng, 2, 3, 5))


def _swiglu(x, W_gate, W_up, W_down):
    return F.linear(F.silu(F.linear(x, W_gate)) * F.linear(x, W_up), W_down)


def _gqa(q, k, v):
    n = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, F.repeat_heads(k, n), F.repeat_heads(v, n), causal=True)


# ------------------------------------------------------------------ the online softmax: a forward exercise


def _online_draw(rng):
    B, Tq, Tk, Dv = 2, 5, 11, 3
    s = 1.5 * _apart(rng, B, Tq, Tk)
    s[0, 2] += 700.0   # exp(s) overflows without the max shift
    s[1, 4] -= 800.0   # exp(s) underflows to 0 (then 0 / 0) with a wrong shift
    s = np.where(flash_sheet.future(slice(0, Tq), slice(0, Tk), Tq, Tk), -np.inf, s)
    return {"s": s, "v": _signed(rng, B, Tk, Dv)}, 0.37  # a forward exercise: the upstream gradient is unused


def _online_engine(inputs, dout) -> dict:
    """tinygpt's softmax and log_softmax over the whole row: out = softmax(s) V, lse = s - log_softmax(s)."""
    s = tg.tensor(inputs["s"], dtype=np.float64, device="cpu")
    out = F.softmax(s) @ tg.tensor(inputs["v"], dtype=np.float64, device="cpu")
    return {"out": out.numpy(), "lse": inputs["s"][..., 0] - F.log_softmax(s).numpy()[..., 0]}  # key 0: seen by every row


def _online_plain(inputs, dout) -> dict:
    """The untiled computation in NumPy: the max-shifted softmax of each whole row."""
    s, v = inputs["s"], inputs["v"]
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    return {"out": e / e.sum(axis=-1, keepdims=True) @ v, "lse": (m + np.log(e.sum(axis=-1, keepdims=True)))[..., 0]}


def _online_regions(name, inputs) -> list:
    """Rows that tell mistakes apart: those whose last block of keys is all in their future, and
    those of very large or very negative scores."""
    s = inputs["s"]
    last = (s.shape[-1] - 1) % online_sheet.BLOCK + 1  # the size of the last block of keys
    rows = {"the query rows whose last block of keys is wholly in their future (all -inf)":
            np.isneginf(s[..., -last:]).all(axis=-1),
            "the rows of scores near +700 or -800 (where exp overflows or underflows)": np.abs(s[..., 0]) > 100,
            "the rows whose running maximum grows after the first block (the rest have theirs in block 0)":
            s.max(axis=-1) > s[..., :online_sheet.BLOCK].max(axis=-1)}
    shape = (*s.shape[:2], inputs["v"].shape[-1])
    return [(words, np.broadcast_to(mask[..., None], shape) if name == "out" else mask) for words, mask in rows.items()]


ONLINE = Exercise("online_softmax", "hard", "FlashAttention's forward: the running max and sum, one block of keys at a time",
                  {"B": 2, "Tq": 5, "Tk": 11, "Dv": 3}, _online_draw, _online_engine, answers_modern.online_softmax,
                  grads=("out", "lse"), numeric=_online_plain, fill=("step", "finish"), driver="run",
                  regions=_online_regions)
assert online_sheet.BLOCK not in ONLINE.dims.values()


# ------------------------------------------------------------------ the tiled backward: held to a memory limit


def _flash_draw(rng):
    B, H, Tq, Tk, D = 2, 3, 29, 38, 5
    return {"q": _apart(rng, B, H, Tq, D), "k": _apart(rng, B, H, Tk, D), "v": _apart(rng, B, H, Tk, D)}, _apart(rng, B, H, Tq, D)


def flash_memory(inputs) -> tuple:
    """(bytes, why): the gradients themselves, D, and less than one [B, H, Tq, Tk] array besides."""
    q, k = inputs["q"], inputs["k"]
    grads = (q.size + 2 * k.size) * 8
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * 8
    limit = grads + q.size * 8 + int(0.75 * scores)
    return limit, (f"one [B, H, Tq, Tk] array of scores or probabilities alone is {scores:,} bytes; rebuild P one "
                   f"[B, H, {flash_sheet.BLOCK}, {flash_sheet.BLOCK}] tile at a time from L, and get the softmax's row "
                   "sum from dout and out before the loop")


MODERN = [
    _op("rms_norm", "medium", "RMSNorm: LayerNorm without the mean; two paths from x to y",
        {"B": 2, "T": 3, "C": 7},
        lambda rng: ({"x": _apart(rng, 2, 3, 7), "weight": scales(rng, 7)}, _signed(rng, 2, 3, 7)),
        lambda x, weight: F.rms_norm(x, weight, eps=rms_sheet.EPS)),
    _op("rope", "medium", "rotary position embeddings: the backward is the rotation back, positions after a KV cache",
        {"B": 2, "H": 3, "T": 5, "D": 8},
        lambda rng: ({"x": _signed(rng, 2, 3, 5, 8), "positions": np.arange(ROPE_START, ROPE_START + 5)},
                     _signed(rng, 2, 3, 5, 8)),
        lambda x, positions: F.rope(x, positions, theta=rope_sheet.THETA)),
    _op("swiglu", "medium", "the SwiGLU feed-forward: silu's derivative, a gated product, x used twice",
        {"B": 2, "T": 3, "C": 5, "HID": 7}, _swiglu_draw, _swiglu),
    _op("gqa", "hard", "grouped-query attention: each shared key/value head sums its group's gradients",
        {"B": 3, "H": 4, "H_kv": 2, "T": 5, "D": 7},
        lambda rng: ({"q": _apart(rng, 3, 4, 5, 7), "k": _apart(rng, 3, 2, 5, 7), "v": _apart(rng, 3, 2, 5, 7)},
                     _apart(rng, 3, 4, 5, 7)),
        _gqa),
    ONLINE,
    _op("flash_backward", "hard", "FlashAttention's backward: P rebuilt tile by tile from the saved log-sum-exp",
        {"B": 2, "H": 3, "Tq": 29, "Tk": 38, "D": 5}, _flash_draw,
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True), memory=flash_memory),
]
