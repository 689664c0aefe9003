"""Hugging Face Llama, Qwen3 and Mistral folders into LlamaModel and back.

A folder holds config.json and the weights: model.safetensors, or shards listed by
model.safetensors.index.json ({"weight_map": {tensor name: shard file}}). The tensor names
map one to one onto ours (no transposes: both store linear weights as (out, in)):

    model.embed_tokens.weight                        tok_emb.weight
    model.layers.i.input_layernorm.weight            trf_blocks.i.norm1.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.weight   trf_blocks.i.att.{W_query,W_key,W_value,out_proj}.weight
    model.layers.i.self_attn.{q,k}_norm.weight       trf_blocks.i.att.{q,k}_norm.weight     (Qwen3)
    model.layers.i.post_attention_layernorm.weight   trf_blocks.i.norm2.weight
    model.layers.i.mlp.{gate,up,down}_proj.weight    trf_blocks.i.ff.{fc1,fc2,fc3}.weight
    model.norm.weight                                final_norm.weight
    lm_head.weight                                   out_head.weight (absent when tied)

Weights are read lazily: safetensor_files.py maps each file into memory, and one tensor at a time
is converted into its parameter, so loading needs the model's size plus its largest tensor.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from tinygpt import backend, files
from tinygpt.llama import LlamaModel, full_config
from tinygpt.safetensor_files import SafetensorsFile, save_safetensors

MODEL_TYPES = ("llama", "qwen3", "mistral")
# transformers' defaults for fields a config.json may leave out (LlamaConfig, Qwen3Config, MistralConfig)
MAX_POSITIONS = {"llama": 2048, "qwen3": 32768, "mistral": 4096 * 32}
ACTIVATIONS = ("silu", "swish")  # transformers' names for x * sigmoid(x)
ROPE_TYPES = ("default", "llama3")


class HFConfigError(ValueError):
    """A config.json asking for math LlamaModel does not do, or holding impossible values."""


def _block_map(i: int, qk_norm: bool) -> list[tuple[str, str]]:
    ours, hf = f"trf_blocks.{i}.", f"model.layers.{i}."
    rows = [("norm1.weight", "input_layernorm.weight"), ("att.W_query.weight", "self_attn.q_proj.weight"),
            ("att.W_key.weight", "self_attn.k_proj.weight"), ("att.W_value.weight", "self_attn.v_proj.weight"),
            ("att.out_proj.weight", "self_attn.o_proj.weight"), ("norm2.weight", "post_attention_layernorm.weight"),
            ("ff.fc1.weight", "mlp.gate_proj.weight"), ("ff.fc2.weight", "mlp.up_proj.weight"),
            ("ff.fc3.weight", "mlp.down_proj.weight")]
    if qk_norm:
        rows += [("att.q_norm.weight", "self_attn.q_norm.weight"), ("att.k_norm.weight", "self_attn.k_norm.weight")]
    return [(ours + a, hf + b) for a, b in rows]


def weight_map(cfg: dict) -> list[tuple[str, str]]:
    """(our parameter name, Hugging Face tensor name) for every parameter of LlamaModel(cfg)."""
    rows = [("tok_emb.weight", "model.embed_tokens.weight")]
    for i in range(cfg["n_layers"]):
        rows += _block_map(i, cfg["qk_norm"])
    rows.append(("final_norm.weight", "model.norm.weight"))
    return rows if cfg["tie_weights"] else rows + [("out_head.weight", "lm_head.weight")]


# ------------------------------------------------------------------ config.json


def _rope(hf: dict) -> tuple[float, dict | None, list[str]]:
    """(theta, llama3 scaling or None, problems) from rope_theta + rope_scaling (transformers 4)
    or rope_parameters (transformers 5), which older and newer folders write. As transformers
    reads them: rope_scaling, when present, replaces rope_parameters whole, and rope_theta and
    partial_rotary_factor outside the dict count where it has none."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    problems = []
    if kind not in ROPE_TYPES:
        problems.append(f"rope_type={kind!r} is not supported (tinygpt's RoPE does {', '.join(ROPE_TYPES)})")
    if partial not in (None, 1.0):
        problems.append(f"partial_rotary_factor={partial!r} is not supported (tinygpt's RoPE turns every value of a head)")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        problems.append(f"rope_theta={theta!r} must be a positive number")
    if kind != "llama3":
        return theta, None, problems
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        return theta, None, problems + [f"rope_type 'llama3' needs {', '.join(missing)}"]
    return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}, problems


def _sliding_window(hf: dict, kind: str, context: int, layers: int) -> tuple[int, list[str]]:
    """The context length once sliding-window attention is honoured, and problems. A window at
    least as long as the context changes nothing. Mistral's applies to every layer: within
    sliding_window tokens attention is exact, so the context is capped there. Qwen3's applies,
    as transformers reads it, only with use_sliding_window, to the layers from max_window_layers
    on (or those layer_types names): LlamaModel's layers all attend to the whole context."""
    window = hf.get("sliding_window")
    if window is None or window >= context:
        return context, []
    if kind == "mistral":
        return window, []
    if kind != "qwen3" or not hf.get("use_sliding_window"):
        return context, []
    first = hf.get("max_window_layers", 28)
    layer_types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if "sliding_attention" in layer_types:
        return context, [f"sliding_window={window!r} with use_sliding_window=true is not supported "
                         "(tinygpt's layers attend to the whole context)"]
    return context, []


def config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """Our Llama config for a Hugging Face config.json of model_type llama, qwen3 or mistral.
    Every field that changes the forward pass is honoured or refused (HFConfigError naming each
    field and value); the rest (token ids, dropout rates, dtype, use_cache, initializer_range,
    pretraining_tp, which only splits the same products) cannot change the logits."""
    if not isinstance(hf, dict):
        raise HFConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise HFConfigError(f"{source}: model_type={kind!r} is not supported (tinygpt loads {', '.join(MODEL_TYPES)})")
    sizes = {"vocab_size": hf.get("vocab_size"), "hidden_size": hf.get("hidden_size"),
             "intermediate_size": hf.get("intermediate_size"), "num_hidden_layers": hf.get("num_hidden_layers"),
             "num_attention_heads": hf.get("num_attention_heads"),
             "max_position_embeddings": hf.get("max_position_embeddings", MAX_POSITIONS[kind])}
    problems = [f"{k}={v!r} must be a positive integer" for k, v in sizes.items()
                if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if problems:
        raise HFConfigError(f"{source}: " + "; ".join(problems))
    heads = sizes["num_attention_heads"]
    head_dim = hf.get("head_dim") or sizes["hidden_size"] // heads
    theta, scaling, problems = _rope(hf)
    context, window_problems = _sliding_window(hf, kind, sizes["max_position_embeddings"], sizes["num_hidden_layers"])
    eps = hf.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        problems.append(f"rms_norm_eps={eps!r} must be a number in (0, 1)")
    rules = [("hidden_act", hf.get("hidden_act", "silu") in ACTIVATIONS, "tinygpt's feed-forward gate is silu"),
             ("attention_bias", not hf.get("attention_bias", False), "tinygpt's attention projections have no bias"),
             ("mlp_bias", not hf.get("mlp_bias", False), "tinygpt's feed-forward has no bias"),
             ("is_encoder_decoder", not hf.get("is_encoder_decoder", False), "these models are decoders only"),
             ("quantization_config", not hf.get("quantization_config"), "tinygpt reads float weights only")]
    problems += window_problems + [f"{name}={hf.get(name)!r} is not supported ({why})" for name, ok, why in rules if not ok]
    if problems:
        raise HFConfigError(f"{source}: " + "; ".join(problems))
    cfg = {"vocab_size": sizes["vocab_size"], "context_length": context, "emb_dim": sizes["hidden_size"],
           "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads, "n_layers": sizes["num_hidden_layers"],
           "hidden_dim": sizes["intermediate_size"], "head_dim": head_dim, "rope_theta": float(theta),
           "rope_scaling": scaling, "rms_norm_eps": float(eps), "qk_norm": kind == "qwen3",
           "tie_weights": bool(hf.get("tie_word_embeddings", False))}
    try:
        return full_config(cfg)
    except ValueError as e:
        raise HFConfigError(f"{source}: {e}") from None


def config_to_hf(cfg: dict) -> dict:
    """The config.json of a LlamaModel: qwen3 when it has QK-norm, else llama."""
    kind = "qwen3" if cfg["qk_norm"] else "llama"
    hf = {"architectures": ["Qwen3ForCausalLM" if cfg["qk_norm"] else "LlamaForCausalLM"], "model_type": kind,
          "vocab_size": cfg["vocab_size"], "hidden_size": cfg["emb_dim"], "intermediate_size": cfg["hidden_dim"],
          "num_hidden_layers": cfg["n_layers"], "num_attention_heads": cfg["n_heads"],
          "num_key_value_heads": cfg["n_kv_heads"], "head_dim": cfg["head_dim"], "hidden_act": "silu",
          "max_position_embeddings": cfg["context_length"], "rms_norm_eps": cfg["rms_norm_eps"],
          "tie_word_embeddings": cfg["tie_weights"], "attention_bias": False, "rope_theta": cfg["rope_theta"],
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"], **(cfg["rope_scaling"] or {})},
          "torch_dtype": "float32"}
    if kind == "llama":
        hf["mlp_bias"] = False
    if cfg["rope_scaling"]:
        hf["rope_scaling"] = dict(cfg["rope_scaling"])
    return hf


# ------------------------------------------------------------------ weights


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, for a single model.safetensors or an index of shards."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map_ = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no weight_map: {e})") from None
        for shard in sorted(set(weight_map_.values())):
            if not (folder / shard).exists():
                raise FileNotFoundError(f"{index} lists shard {shard}, which is missing from {folder}")
        return {name: folder / shard for name, shard in weight_map_.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    return {name: single for name in SafetensorsFile(single).keys()}


def load_llama(folder: str | os.PathLike, device: str | None = None, dtype=None) -> LlamaModel:
    """LlamaModel from a Hugging Face folder (config.json + safetensors), in `dtype` (default:
    the default dtype) on `device`. A tensor the config does not expect, of another shape, or
    missing, is a ValueError naming it (and both shapes) before any weight is copied."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: expected a Hugging Face model folder")
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    files = _tensor_files(folder)
    opened = {path: SafetensorsFile(path) for path in set(files.values())}
    with backend.device_scope(device):
        model = LlamaModel(cfg)
    params = dict(model.named_parameters())
    mapping = weight_map(cfg)
    for ours, hf in mapping:  # every problem found before anything is copied
        if hf not in files:
            raise ValueError(f"{folder}: tensor {hf} is missing (expected shape {params[ours].shape}, for {ours})")
        shape = opened[files[hf]].shape(hf)
        if shape != params[ours].shape:
            raise ValueError(f"{files[hf].name}: tensor {hf} has shape {shape}, expected {params[ours].shape} "
                             f"(for {ours}, from config.json)")
    known = {hf for _, hf in mapping} | {"lm_head.weight"}  # a tied model's file may still carry lm_head
    unexpected = sorted(k for k in files if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"{folder}: tensor {unexpected[0]} is not part of this config's model "
                         f"({len(unexpected)} unexpected tensors)")
    for ours, hf in mapping:
        p = params[ours]
        p.data = backend.make_array(opened[files[hf]].array(hf), dtype=dtype or p.dtype, device=p.device)
    return model.eval()


HF_FILES = {"config.json", "model.safetensors"}  # what save_llama writes, and may replace


def save_llama(model: LlamaModel, out_dir: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors) that
    load_llama and transformers' LlamaForCausalLM / Qwen3ForCausalLM read. The folder is
    written under a temporary name and renamed into place."""
    if model.cfg.get("num_classes"):
        raise ValueError(f"this model is a classifier (num_classes={model.cfg['num_classes']}); a Hugging Face "
                         "causal-LM folder holds only a next-token head over the vocabulary")
    modules = dict(model.named_modules())
    cfg = {**model.cfg, "tie_weights": _weight(modules, "out_head.weight") is _weight(modules, "tok_emb.weight")}
    tensors = {hf: np.ascontiguousarray(_merged(_weight(modules, ours))) for ours, hf in weight_map(cfg)}
    hf_config = config_to_hf(cfg) | {"torch_dtype": str(np.dtype(model.tok_emb.weight.dtype))}
    out = Path(out_dir)
    files.check_replaceable(out, HF_FILES)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.make_temp_dir(out.parent, prefix=f".tmp-{out.name}-")
    try:
        save_safetensors(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        files.replace_folder(tmp, out, HF_FILES)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _weight(modules: dict, name: str):
    """The module holding parameter `name` ("trf_blocks.0.att.W_query.weight"): a Linear or
    Embedding, or a LoRA-wrapped Linear (finetune/lora.py), returned whole."""
    module = modules[name.rsplit(".", 1)[0]]
    return module if hasattr(module, "lora") else module.weight


def _merged(weight) -> np.ndarray:
    """A weight as a host array; a LoRA-wrapped Linear's is merged, W + (alpha / rank) (A B)^T,
    so that the saved model computes what the finetuned one does without the adapters."""
    if not hasattr(weight, "lora"):
        return weight.numpy()
    lora = weight.lora
    return weight.linear.weight.numpy() + (lora.alpha / lora.rank) * (lora.A.numpy() @ lora.B.numpy()).T


def is_llama_folder(folder: str | os.PathLike) -> bool:
    """Whether folder holds a config.json naming a model_type other than gpt2: load_llama reads
    it, or refuses it naming the model_type."""
    config = Path(folder) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") not in (None, "gpt2")
    except (OSError, ValueError, AttributeError):
        return False
