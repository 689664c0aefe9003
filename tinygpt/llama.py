"""LlamaModel: GPTModel's sibling for the Llama family (Llama 3.x, SmolLM2, Qwen3, Mistral).

The same stack as model.py, token embeddings -> blocks -> final norm -> output head, with
the parts those models changed:
    RMSNorm instead of LayerNorm     rescale each vector by its root mean square, no mean, no shift
    RoPE instead of pos_emb          positions enter by rotating queries and keys (functional/rope.py)
    SwiGLU feed-forward              fc3(silu(fc1(x)) * fc2(x)): a gate, an up and a down projection
                                     (silu(gate) * up as one op, F.swiglu)
    grouped-query attention          n_kv_heads key/value heads, each shared by n_heads / n_kv_heads
                                     query heads: the KV cache shrinks by that factor
    QK-norm (Qwen3, optional)        RMSNorm over each head's query and key, before RoPE
and no biases and no dropout. Names follow the book's Llama and Qwen3 chapters: att.W_query,
att.W_key, att.W_value, att.out_proj, att.q_norm, att.k_norm, ff.fc1 (gate), ff.fc2 (up),
ff.fc3 (down), norm1, norm2, final_norm, out_head, tok_emb. tinygpt/hf_llama.py maps them to
Hugging Face's names.

Initialisation is PyTorch's default for each layer, as in model.py (norm weights 1), except
that tied embeddings take out_head's initialisation, uniform in +-1/sqrt(emb_dim): the final
RMSNorm hands out_head vectors of length sqrt(emb_dim), so N(0, 1) rows, tok_emb's default,
would give the untrained logits a standard deviation of sqrt(emb_dim) (24 at SmolLM2's width:
a first loss of 438 instead of ln(49152) = 10.8), where out_head's gives 1/sqrt(3) = 0.58, as
for the GPT. The embeddings' own scale matters less: each block sees them through RMSNorm.
"""
from __future__ import annotations

import math

from tinygpt import backend, nn
from tinygpt import functional as F
from tinygpt.creation import ones
from tinygpt.tensor import Tensor



def swiglu_hidden(emb_dim: int) -> int:
    """Llama's feed-forward width: 2/3 of GPT's 4 * emb_dim, so that three matrices hold as many
    parameters as GPT's two, rounded up to a multiple of 8."""
    return 8 * math.ceil(2 * 4 * emb_dim / 3 / 8)


# A model for the default text (`tinygpt train --arch llama`), the default GPT's size with half as many kv heads.
LLAMA_CONFIG_SMALL = {"vocab_size": 1024, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_kv_heads": 2,
                      "n_layers": 4, "hidden_dim": swiglu_hidden(128), "rope_theta": 10000.0, "rope_scaling": None,
                      "rms_norm_eps": 1e-5, "qk_norm": False, "tie_weights": False}

# The real shapes, from each model's config.json on the Hugging Face Hub.
LLAMA_PRESETS = {
    "llama-small": {**LLAMA_CONFIG_SMALL},
    "smollm2-135m": {"vocab_size": 49152, "context_length": 8192, "emb_dim": 576, "n_heads": 9, "n_kv_heads": 3,
                     "n_layers": 30, "hidden_dim": 1536, "head_dim": 64, "rope_theta": 100000.0, "rope_scaling": None,
                     "rms_norm_eps": 1e-5, "qk_norm": False, "tie_weights": True},
    "qwen3-0.6b": {"vocab_size": 151936, "context_length": 40960, "emb_dim": 1024, "n_heads": 16, "n_kv_heads": 8,
                   "n_layers": 28, "hidden_dim": 3072, "head_dim": 128, "rope_theta": 1000000.0, "rope_scaling": None,
                   "rms_norm_eps": 1e-6, "qk_norm": True, "tie_weights": True},
    "llama3.2-1b": {"vocab_size": 128256, "context_length": 131072, "emb_dim": 2048, "n_heads": 32, "n_kv_heads": 8,
                    "n_layers": 16, "hidden_dim": 8192, "head_dim": 64, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    "rms_norm_eps": 1e-5, "qk_norm": False, "tie_weights": True},
}

_REQUIRED = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads", "n_layers", "hidden_dim")
# drop_rate is always 0 (these models train without dropout); it is kept for the tools that print it.
_DEFAULTS = {"rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-5, "qk_norm": False, "tie_weights": False,
             "drop_rate": 0.0}


def full_config(cfg: dict) -> dict:
    """cfg with its defaults filled in (head_dim: emb_dim // n_heads), checked: a KeyError for a
    missing size, a ValueError naming the values that cannot make a model."""
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise KeyError(f"Llama config lacks {', '.join(missing)}")
    cfg = {**_DEFAULTS, **cfg, "arch": "llama"}
    _check_sizes(cfg, _REQUIRED)
    cfg.setdefault("head_dim", cfg["emb_dim"] // cfg["n_heads"])  # once n_heads is known to be positive
    _check_sizes(cfg, ("head_dim",))
    if cfg["n_heads"] % cfg["n_kv_heads"]:
        raise ValueError(f"Llama config: n_kv_heads={cfg['n_kv_heads']} does not divide n_heads={cfg['n_heads']}")
    if cfg["head_dim"] % 2:
        raise ValueError(f"Llama config: head_dim={cfg['head_dim']} must be even (RoPE turns pairs of values)")
    wrong = [f"{k}={cfg.get(k)!r}" for k, bad in (("drop_rate", cfg["drop_rate"] != 0.0),
                                                   ("qkv_bias", bool(cfg.get("qkv_bias")))) if bad]
    if wrong:
        raise ValueError(f"Llama config: {', '.join(wrong)} is not supported (LlamaModel trains without dropout "
                         "and its attention has no biases)")
    return cfg


def _check_sizes(cfg: dict, keys) -> None:
    bad = [f"{k}={cfg[k]!r}" for k in keys if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1]
    if bad:
        raise ValueError(f"Llama config: {', '.join(bad)} must be positive integers")


def cli_config(preset: str | None, changes: dict, vocab_size: int) -> dict:
    """The config of `tinygpt train --arch llama [--model PRESET] [--emb-dim ...]`: the preset
    (default llama-small) with the options given, head_dim and hidden_dim following emb_dim
    and n_heads where the preset derives them so."""
    base = full_config(LLAMA_PRESETS[preset or "llama-small"])
    cfg = {**base, **changes, "vocab_size": vocab_size}
    if base["head_dim"] == base["emb_dim"] // base["n_heads"]:
        cfg["head_dim"] = cfg["emb_dim"] // cfg["n_heads"]
    if base["hidden_dim"] == swiglu_hidden(base["emb_dim"]):
        cfg["hidden_dim"] = swiglu_hidden(cfg["emb_dim"])
    return full_config(cfg)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last axis (weight starts at 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.eps = eps
        self.weight = nn.Parameter(ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with n_heads query heads and n_kv_heads key/value heads.

    x [B, T, C] -> q [B, H, T, D], k and v [B, H_kv, T, D]; (QK-norm on q and k); RoPE on q and
    k at their positions; attention, where each k/v head serves H / H_kv query heads; heads
    joined and projected back to C by out_proj."""

    def __init__(self, cfg: dict):
        c, d = cfg["emb_dim"], cfg["head_dim"]
        self.n_heads, self.n_kv_heads, self.head_dim = cfg["n_heads"], cfg["n_kv_heads"], d
        self.rope_theta, self.rope_scaling = cfg["rope_theta"], cfg["rope_scaling"]
        self.W_query = nn.Linear(c, self.n_heads * d, bias=False)
        self.W_key = nn.Linear(c, self.n_kv_heads * d, bias=False)
        self.W_value = nn.Linear(c, self.n_kv_heads * d, bias=False)
        self.out_proj = nn.Linear(self.n_heads * d, c, bias=False)
        if cfg["qk_norm"]:
            self.q_norm = RMSNorm(d, cfg["rms_norm_eps"])
            self.k_norm = RMSNorm(d, cfg["rms_norm_eps"])

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, heads, self.head_dim).transpose(1, 2)  # [B,T,heads*D] -> [B,heads,T,D]

    def forward(self, x: Tensor, positions, cache: "nn.LayerCache | None" = None) -> Tensor:
        b, t, _ = x.shape
        q = self._heads(self.W_query(x), self.n_heads)
        k = self._heads(self.W_key(x), self.n_kv_heads)
        v = self._heads(self.W_value(x), self.n_kv_heads)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)  # each head's D values, one weight shared by the heads
        q = F.rope(q, positions, self.rope_theta, self.rope_scaling)
        k = F.rope(k, positions, self.rope_theta, self.rope_scaling)
        if cache is not None:
            k, v = cache.append(k, v)  # [B,H_kv,t,D] -> [B,H_kv,cached+t,D]
        context = F.scaled_dot_product_attention(q, k, v, causal=True)  # k, v shared across each group of heads
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"


class SwiGLU(nn.Module):
    """fc3(silu(fc1(x)) * fc2(x)): fc1 the gate, fc2 the up projection (both C -> hidden_dim),
    fc3 the down projection (hidden_dim -> C)."""

    def __init__(self, cfg: dict):
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False)
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False)
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.swiglu(self.fc1(x), self.fc2(x)))  # silu(gate) * up, one op: keeps 2 hidden arrays, not 4


class LlamaBlock(nn.Module):
    """x + att(norm1(x)), then x + ff(norm2(x)): pre-RMSNorm with shortcuts."""

    def __init__(self, cfg: dict):
        self.att = GroupedQueryAttention(cfg)
        self.ff = SwiGLU(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], cfg["rms_norm_eps"])
        self.norm2 = RMSNorm(cfg["emb_dim"], cfg["rms_norm_eps"])

    def forward(self, x: Tensor, positions, cache: "nn.LayerCache | None" = None) -> Tensor:
        x = x + self.att(self.norm1(x), positions, cache)
        return x + self.ff(self.norm2(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: dict):
        cfg = self.cfg = full_config(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.trf_blocks = nn.ModuleList([LlamaBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"], cfg["rms_norm_eps"])
        if cfg.get("num_classes"):  # a classifier (finetune/classify.py): class logits, as GPTModel's
            self.out_head = nn.Linear(cfg["emb_dim"], cfg["num_classes"])
            return
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg["tie_weights"]:  # one Parameter, two uses, initialised as out_head's (see the module's docstring)
            self.tok_emb.weight = self.out_head.weight

    def forward(self, idx, cache: nn.KVCache | None = None) -> Tensor:
        """Logits [B, T, vocab_size] (or [B, T, num_classes]) for token ids idx [B, T]. With a KV cache (see new_cache),
        idx holds only the tokens after the cached ones, at the positions that follow."""
        ids = idx.data if isinstance(idx, Tensor) else idx
        if ids.ndim != 2:
            raise ValueError(f"expected token ids of shape (batch, tokens), got shape {tuple(ids.shape)}")
        start = cache.length if cache is not None else 0
        end = start + ids.shape[1]
        if end > self.cfg["context_length"]:
            what = f"input has {ids.shape[1]} tokens" + (f" after {start} cached ones" if start else "")
            raise ValueError(f"{what} but context_length is {self.cfg['context_length']}")
        positions = backend.get_backend(self.tok_emb.weight.device).xp.arange(start, end)
        x = self.tok_emb(ids)  # [B,T] -> [B,T,C]; no position embedding: RoPE places the tokens
        layer_caches = cache.layers if cache is not None else [None] * len(self.trf_blocks)
        for block, layer_cache in zip(self.trf_blocks, layer_caches):
            x = block(x, positions, layer_cache)
        return self.out_head(self.final_norm(x))  # [B,T,C] -> [B,T,V]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> nn.KVCache:
        """An empty KV cache for up to max_len (default context_length) tokens per row, holding
        n_kv_heads heads per layer (see cache_bytes for its size)."""
        c, w = self.cfg, self.tok_emb.weight
        max_len = min(max_len or c["context_length"], c["context_length"])
        return nn.KVCache([nn.LayerCache(batch_size, c["n_kv_heads"], max_len, c["head_dim"], w.device, w.dtype)
                           for _ in range(c["n_layers"])])


def cache_bytes(cfg: dict, batch_size: int, max_len: int, bytes_per_value: int = 4) -> int:
    """Size of a full KV cache: keys and values, n_kv_heads heads of head_dim, per token and layer."""
    cfg = full_config(cfg)
    return 2 * cfg["n_layers"] * batch_size * cfg["n_kv_heads"] * max_len * cfg["head_dim"] * bytes_per_value


def parameter_table(cfg: dict) -> list[tuple[str, int]]:
    """(module, parameter count) rows for LlamaModel(cfg), computed without building it."""
    cfg = full_config(cfg)
    c, v, d, hidden = cfg["emb_dim"], cfg["vocab_size"], cfg["head_dim"], cfg["hidden_dim"]
    q_out, kv_out = cfg["n_heads"] * d, cfg["n_kv_heads"] * d
    attention = c * q_out + 2 * c * kv_out + q_out * c + (2 * d if cfg["qk_norm"] else 0)  # W_query/key/value, out_proj
    rows = [("tok_emb", v * c)]
    for i in range(cfg["n_layers"]):
        rows += [(f"trf_blocks.{i}.att", attention), (f"trf_blocks.{i}.ff", 3 * c * hidden),
                 (f"trf_blocks.{i}.norm1", c), (f"trf_blocks.{i}.norm2", c)]
    head = cfg["num_classes"] * (c + 1) if cfg.get("num_classes") else 0 if cfg["tie_weights"] else v * c
    return rows + [("final_norm", c), ("out_head", head)]


def count_parameters(cfg: dict) -> int:
    """The parameter count of LlamaModel(cfg), from the config alone (tied weights count once)."""
    return sum(count for _, count in parameter_table(cfg))


def preset_summary(name: str) -> list[str]:
    """`tinygpt info --model NAME` for a Llama preset: its shape, parameters module by module, the KV cache."""
    cfg = full_config(LLAMA_PRESETS[name])
    rows, n = dict(parameter_table(cfg)), cfg["n_layers"]
    block = {part: rows[f"trf_blocks.0.{part}"] for part in ("att", "ff", "norm1", "norm2")}
    per_block, total = sum(block.values()), count_parameters(cfg)
    lines = [f"{name}: vocab {cfg['vocab_size']}, context {cfg['context_length']}, emb_dim {cfg['emb_dim']}, {n} layers, "
             f"{cfg['n_heads']} heads ({cfg['n_kv_heads']} kv heads) of {cfg['head_dim']}, hidden_dim {cfg['hidden_dim']}, "
             f"qk_norm {cfg['qk_norm']}, tied {cfg['tie_weights']}", f"{'module':<34}{'parameters':>14}",
             f"{'tok_emb':<34}{rows['tok_emb']:>14,}", f"{f'trf_blocks ({n} x {per_block:,})':<34}{n * per_block:>14,}"]
    lines += [f"{'  each block .' + part:<34}{count:>14,}" for part, count in block.items()]
    lines += [f"{'final_norm':<34}{rows['final_norm']:>14,}", f"{'out_head':<34}{rows['out_head']:>14,}"
              + ("   (tied to tok_emb)" if cfg["tie_weights"] else ""),
              f"{'total':<34}{total:>14,}   ({total * 4 / 1024**2:.2f} MB in float32)",
              f"KV cache: {cache_bytes(cfg, 1, 1):,} bytes per token in float32 "
              f"({cfg['n_kv_heads']} of {cfg['n_heads']} heads cached)"]
    return lines
