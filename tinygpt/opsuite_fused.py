"""Gradient-check cases of the fused ops of tinygpt.functional, and of a composition of them
(registered into the one list: see opsuite.py)."""
from __future__ import annotations

from typing import Any


import tinygpt.functional as F
from tinygpt.functional.flash_attention import flash_attention as tiled_attention
from tinygpt.opcase import Picker, case, same



@case("linear", max_examples=125, examples=[
    {"lead": (2, 3), "in_features": 5, "out_features": 4, "bias": True},  # (B, T, in) input
    {"lead": (2, 3), "in_features": 4, "out_features": 3, "bias": True},
    {"lead": (3,), "in_features": 2, "out_features": 4, "bias": False}])
def linear(pick):
    lead, in_features, out_features = pick.shape(1, 2, name="lead"), pick.dim("in_features"), pick.dim("out_features")
    bias = pick.booleans(name="bias")
    shapes = [lead + (in_features,), (out_features, in_features)] + [(out_features,)] * bias
    return F.linear, pick.leaves(*shapes), lambda torch, *tensors: torch.nn.functional.linear(*tensors)


@case("embedding", max_examples=100, examples=[{"vocab": 10, "dim": 4, "ids_shape": (3,), "as_tensor": True}])
def embedding(pick):
    vocab, dim = pick.dim("vocab"), pick.dim("dim")
    ids = pick.ids(vocab, pick.shape(1, 2, name="ids_shape") + (2,))
    ids[..., 1] = ids[..., 0]  # every id appears at least twice: its gradient rows must add up
    host_ids = ids
    ids = pick.constant(ids) if pick.booleans(name="as_tensor") else ids
    return ((lambda weight: F.embedding(ids, weight)), [pick.leaf((vocab, dim))],
            lambda torch, weight: torch.nn.functional.embedding(torch.as_tensor(host_ids), weight))


@case("layer_norm", max_examples=125, examples=[{"shape": (2, 3, 6)}])
def layer_norm(pick):
    shape = pick.shape(1, 3, name="shape")
    return (F.layer_norm, pick.leaves(shape, shape[-1:], shape[-1:]),
            lambda torch, x, scale, shift: torch.nn.functional.layer_norm(x, shape[-1:], scale, shift, eps=1e-5))


@case("gelu", max_examples=100, examples=[{"shape": (3, 7)}])
def gelu(pick):
    x = pick.leaf(pick.shape(name="shape"))
    x.data *= 3  # reach the tails, where the tanh saturates
    return F.gelu, [x], lambda torch, x: torch.nn.functional.gelu(x, approximate="tanh")


def _softmax_family(name: str, example: dict[str, Any]) -> None:
    @case(name, max_examples=100, examples=[example])
    def softmax_family(pick):
        shape = pick.shape(1, 3, name="shape")
        axis, fn = pick.integers(-len(shape), len(shape) - 1, name="axis"), getattr(F, name)
        return (lambda x: fn(x, axis=axis)), [pick.leaf(shape)], lambda torch, x: getattr(torch, name)(x, dim=axis)


_softmax_family("softmax", {"shape": (3, 5), "axis": 0})
_softmax_family("log_softmax", {"shape": (3, 5), "axis": -1})


def _torch_attention(torch, q, k, v, causal: bool):
    """torch's attention with tinygpt's causal alignment: query i sees keys up to i + (Tk - Tq)."""
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _attention(pick: Picker, dropout_p: float):
    """q (..., tq, d), k (..., tk, d), v (..., tk, dv); causal needs tq <= tk (each query sees
    its own position, aligned to the last keys)."""
    lead, causal, tk = pick.shape(1, 2, name="lead"), pick.booleans(name="causal"), pick.dim("tk", high=3)
    tq, d, dv = pick.dim("tq", high=tk if causal else 3), pick.dim("d", high=3), pick.dim("dv", high=3)
    # gradcheck reseeds the library's generators before every evaluation, so dropout
    # draws the same mask in every forward and in backward
    reference = (lambda torch, q, k, v: _torch_attention(torch, q, k, v, causal)) if dropout_p == 0.0 else None
    return ((lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p)),
            pick.leaves(lead + (tq, d), lead + (tk, d), lead + (tk, dv)), reference)


@case("attention", max_examples=75, examples=[
    {"lead": (2, 2), "causal": True, "tk": 5, "tq": 5, "d": 3, "dv": 3},
    {"lead": (1, 2), "causal": True, "tk": 3, "tq": 2, "d": 2, "dv": 3}])  # fewer queries than keys
def attention(pick):
    return _attention(pick, dropout_p=0.0)


@case("attention_dropout", max_examples=75, examples=[
    {"lead": (1, 2), "causal": True, "tk": 4, "tq": 4, "d": 3, "dv": 3, "p": 0.3},
    {"lead": (2, 1), "causal": True, "tk": 3, "tq": 3, "d": 2, "dv": 2, "p": 0.5}])
def attention_dropout(pick):
    return _attention(pick, dropout_p=pick.sampled_from((0.3, 0.5, 0.6), name="p"))


@case("cross_entropy", max_examples=150, examples=[
    {"lead": (6,), "classes": 7, "ignore_index": -100, "as_tensor": True},
    {"lead": (2, 3), "classes": 4, "ignore_index": -100}])  # (B, T, C) logits, (B, T) targets
def cross_entropy(pick):
    lead, classes = pick.shape(1, 2, name="lead"), pick.dim("classes")
    ignore_index = pick.sampled_from((-100, -1, 2), name="ignore_index")
    targets = pick.ids(classes, lead)
    targets[pick.rng.random(lead) < 0.4] = ignore_index
    targets.flat[0] = (ignore_index + 1) % classes  # at least one counted target
    host_targets = targets
    targets = pick.constant(targets) if pick.booleans(name="as_tensor") else targets

    def reference(torch, logits):  # torch wants (N, C) logits and (N,) targets
        flat = torch.as_tensor(host_targets.reshape(-1))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, classes), flat, ignore_index=ignore_index)
    return (lambda logits: F.cross_entropy(logits, targets, ignore_index=ignore_index)), [pick.leaf(lead + (classes,))], reference


DROPOUT_P = (0.5, 0.0, 0.3, 0.9, 1.0)


@case("dropout", max_examples=40, examples=[{"shape": (4, 5)}], each=("p", DROPOUT_P))
def dropout(pick):
    p = pick.sampled_from(DROPOUT_P, name="p")
    reference = (lambda torch, x: torch.nn.functional.dropout(x, p)) if p == 0.0 else None  # the masks differ
    return (lambda x: F.dropout(x, p, training=True)), [pick.leaf(pick.shape(name="shape"))], reference


@case("flash_attention", max_examples=40, examples=[
    {"lead": (1, 2), "causal": True, "tk": 5, "tq": 5, "d": 2, "dv": 3, "block": 2},  # T not a multiple of the block
    {"lead": (2,), "causal": True, "tk": 5, "tq": 2, "d": 3, "dv": 2, "block": 3},    # fewer queries than keys
    {"lead": (1,), "causal": False, "tk": 3, "tq": 4, "d": 2, "dv": 1, "block": 2}])
def flash_attention(pick):
    """The tiled lesson op (functional/flash_attention.py), blocks smaller than T."""
    lead, causal, tk = pick.shape(1, 2, name="lead"), pick.booleans(name="causal"), pick.dim("tk", high=5)
    tq, d, dv = pick.dim("tq", high=tk if causal else 4), pick.dim("d", high=3), pick.dim("dv", high=3)
    block = pick.integers(1, 4, name="block")
    return ((lambda q, k, v: tiled_attention(q, k, v, causal=causal, block_size=block)),
            pick.leaves(lead + (tq, d), lead + (tk, d), lead + (tk, dv)),
            lambda torch, q, k, v: _torch_attention(torch, q, k, v, causal))


# ============================================================================ compositions


@case("mlp_chain", max_examples=60, examples=[{"batch": 2, "steps": 3, "channels": 3, "hidden": 4, "vocab": 3}])
def mlp_chain(pick):
    """layer_norm -> linear -> gelu -> linear -> cross_entropy, a GPT block's feed-forward and
    head, with one ignored target position."""
    batch, steps, channels = pick.dim("batch", high=2), pick.dim("steps", high=3), pick.dim("channels", low=2, high=3)
    hidden, vocab = pick.dim("hidden"), pick.dim("vocab", low=2, high=3)
    params = pick.leaves((batch, steps, channels), (channels,), (channels,), (hidden, channels), (hidden,),
                         (vocab, hidden), (vocab,))
    targets = pick.ids(vocab, (batch, steps))
    if targets.size > 1:
        targets[-1, -1] = -100  # an ignored position must contribute nothing

    def loss(x, scale, shift, w1, b1, w2, b2):
        h = F.gelu(F.linear(F.layer_norm(x, scale, shift), w1, b1))  # [B, T, C] -> [B, T, hidden]
        return F.cross_entropy(F.linear(h, w2, b2), targets)  # [B, T, hidden] -> [B, T, V] -> scalar

    def reference(torch, x, scale, shift, w1, b1, w2, b2):
        TF = torch.nn.functional
        h = TF.gelu(TF.linear(TF.layer_norm(x, (channels,), scale, shift, eps=1e-5), w1, b1), approximate="tanh")
        return TF.cross_entropy(TF.linear(h, w2, b2).reshape(-1, vocab), torch.as_tensor(targets.reshape(-1)))
    return loss, params, reference


@case("used_twice", max_examples=60, examples=[{"shape": (2, 3)}])
def used_twice(pick):
    """x feeds two consumers: its gradient is the sum of both (2x + 1)."""
    return (lambda x: x * x + x), [pick.leaf(pick.shape(name="shape"))], same(lambda x: x * x + x)
