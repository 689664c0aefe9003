"""GPTModel (book chapter 4): token and position embeddings, a stack of transformer blocks,
a final LayerNorm and a linear output head over the vocabulary.

Initialisation is the book's, which is PyTorch's default for each layer: Embedding weights
~ N(0, 1), Linear weights and biases ~ U(-1/sqrt(in_features), +1/sqrt(in_features)),
LayerNorm scale 1 and shift 0. The final LayerNorm gives unit-variance features, so the
output head's logits start with a standard deviation of about sqrt(emb_dim / (3 emb_dim)) =
0.58: the untrained loss is ln(vocab_size) + 0.58^2 / 2 = 10.99 for GPT-2's 50,257 tokens,
as the book reports, with every token about equally likely. (GPT-2's own scheme, N(0, 0.02)
with depth-scaled residual projections, starts at the same loss but learns the book's small
chapter-5 corpus much more slowly at the book's learning rate: train loss 5.98 after 46
steps, against the book's 2.85 after 45.)
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping

from tinygpt import backend, nn
from tinygpt.kernels import decode
from tinygpt.tensor import Tensor

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2 BPE vocabulary
    "context_length": 1024,  # longest input, in tokens
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

GPT_PRESETS = {
    "gpt2-small": {**GPT_CONFIG_124M},
    "gpt2-medium": {**GPT_CONFIG_124M, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**GPT_CONFIG_124M, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**GPT_CONFIG_124M, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}

_REQUIRED = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


def _check_sizes(cfg: dict) -> None:
    """The config's sizes make a model: a mistake is one line naming the key, not a division by
    zero deep inside a layer."""
    for key, least in (("vocab_size", 1), ("context_length", 1), ("emb_dim", 1), ("n_heads", 1), ("n_layers", 0)):
        if not isinstance(cfg[key], numbers.Integral) or isinstance(cfg[key], bool) or cfg[key] < least:
            raise ValueError(f"GPT config {key} must be an integer >= {least}, got {cfg[key]!r}")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(f"GPT config emb_dim {cfg['emb_dim']} must be a multiple of n_heads {cfg['n_heads']} "
                         f"(each head gets emb_dim / n_heads features)")
    if not 0 <= cfg["drop_rate"] < 1:
        raise ValueError(f"GPT config drop_rate must be in [0, 1), got {cfg['drop_rate']!r}")


class GPTModel(nn.Module):
    def __init__(self, cfg: dict):
        if not isinstance(cfg, Mapping):
            raise TypeError(f"GPTModel needs a config dict such as GPT_CONFIG_124M, got {type(cfg).__name__}")
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise KeyError(f"GPT config lacks {', '.join(missing)}")
        _check_sizes(cfg)
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[nn.TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = nn.LayerNorm(cfg["emb_dim"], eps=cfg.get("layer_norm_eps", 1e-5))
        if cfg.get("num_classes"):  # a classifier (chapter 6): class logits instead of next-token logits
            self.out_head = nn.Linear(cfg["emb_dim"], cfg["num_classes"])
        else:
            self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
            if cfg.get("tie_weights", False):
                self.out_head.weight = self.tok_emb.weight  # one Parameter, two uses

    def forward(self, idx, cache: nn.KVCache | None = None) -> Tensor:
        """Logits [B, T, vocab_size] (or [B, T, num_classes]) for token ids idx [B, T]. With a KV cache (see
        new_cache), idx holds only tokens after the cached ones, at the following positions."""
        ids = idx.data if isinstance(idx, Tensor) else idx
        if not backend.is_array(ids):  # nested lists of ids
            ids = backend.make_array(ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"expected token ids of shape (batch, tokens) with at least one token, got shape {tuple(ids.shape)}")
        start = cache.length if cache is not None else 0
        end = start + ids.shape[1]
        if end > self.cfg["context_length"]:
            what = f"input has {ids.shape[1]} tokens" + (f" after {start} cached ones" if start else "")
            raise ValueError(f"{what} but context_length is {self.cfg['context_length']}")
        if cache is not None and decode.applies(self, ids):  # a generated token: the same math on arrays
            return Tensor(decode.gpt_step(self, ids, cache))
        positions = backend.get_backend(self.pos_emb.weight.device).xp.arange(start, end)
        x = self.tok_emb(ids) + self.pos_emb(positions)  # [B,T,C] + [T,C]
        x = self.drop_emb(x)
        if cache is None:
            x = self.trf_blocks(x)
        else:
            for block, layer_cache in zip(self.trf_blocks, cache.layers):
                x = block(x, layer_cache)
        x = self.final_norm(x)
        return self.out_head(x)  # [B,T,C] -> [B,T,V]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> nn.KVCache:
        """An empty KV cache for up to max_len (default context_length) tokens per row."""
        c, w = self.cfg, self.tok_emb.weight
        max_len = min(max_len or c["context_length"], c["context_length"])
        head_dim = c["emb_dim"] // c["n_heads"]
        return nn.KVCache([nn.LayerCache(batch_size, c["n_heads"], max_len, head_dim, w.device, w.dtype)
                           for _ in range(c["n_layers"])])


def count_parameters(cfg: dict) -> int:
    """The parameter count of GPTModel(cfg), from the config alone (tied weights count once)."""
    return sum(count for _, count in parameter_table(cfg))


def parameter_table(cfg: dict) -> list[tuple[str, int]]:
    """(module, parameter count) rows for GPTModel(cfg), computed without building it."""
    d, v, n = cfg["emb_dim"], cfg["vocab_size"], cfg["n_layers"]
    attention = 3 * d * d + (3 * d if cfg["qkv_bias"] else 0) + d * d + d  # W_query/key/value, out_proj (+bias)
    feed_forward = d * 4 * d + 4 * d + 4 * d * d + d                       # Linear(d, 4d), Linear(4d, d)
    rows = [("tok_emb", v * d), ("pos_emb", cfg["context_length"] * d)]
    for i in range(n):
        rows += [(f"trf_blocks.{i}.att", attention), (f"trf_blocks.{i}.ff", feed_forward),
                 (f"trf_blocks.{i}.norm1", 2 * d), (f"trf_blocks.{i}.norm2", 2 * d)]
    if cfg.get("num_classes"):
        head = cfg["num_classes"] * (d + 1)
    else:
        head = 0 if cfg.get("tie_weights", False) else v * d
    rows += [("final_norm", 2 * d), ("out_head", head)]
    return rows


def size_mb(num_parameters: int, bytes_per_parameter: int = 4) -> float:
    """Memory of the weights in MB (1024^2 bytes), float32 by default."""
    return num_parameters * bytes_per_parameter / 1024**2
