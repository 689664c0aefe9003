"""OpenAI's GPT-2 weights, in Hugging Face's layout, into GPTModel and back.

A Hugging Face GPT-2 folder holds `config.json` (n_embd, n_layer, n_head, n_positions,
vocab_size, ...) and `model.safetensors`. Its tensor names map onto the book's like this
(i = block index; an optional "transformer." prefix is ignored):

    wte.weight                 -> tok_emb.weight (and out_head.weight: GPT-2 ties them)
    lm_head.weight             -> out_head.weight, only where tie_word_embeddings is false
    wpe.weight                 -> pos_emb.weight
    h.i.ln_1.weight / .bias    -> trf_blocks.i.norm1.scale / .shift
    h.i.attn.c_attn.weight     -> trf_blocks.i.att.W_query / W_key / W_value .weight
    h.i.attn.c_attn.bias       -> ... .bias (the same three-way split)
    h.i.attn.c_proj.*          -> trf_blocks.i.att.out_proj.*
    h.i.ln_2.*                 -> trf_blocks.i.norm2.*
    h.i.mlp.c_fc.*             -> trf_blocks.i.ff.layers.0.*
    h.i.mlp.c_proj.*           -> trf_blocks.i.ff.layers.2.*
    ln_f.weight / .bias        -> final_norm.scale / .shift

GPT-2's linear layers are "Conv1D" modules that store weights as (in_features, out_features)
and compute x @ W + b; ours store (out, in) and compute x @ W^T + b, so every matrix is
transposed on the way in and out. c_attn holds query, key and value side by side along its
output axis: columns [0, E) are the query, [E, 2E) the key, [2E, 3E) the value.

config.json fields that ask for math tinygpt does not do (another activation, another
attention scaling, cross-attention, ...) are refused by name before anything is loaded;
see config_from_hf.
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tinygpt import backend, files
from tinygpt.errors import RunError
from tinygpt.model import GPTModel

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
_HUB = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some files carry; not weights


def _block_map(i: int, emb: int) -> list[tuple[str, str, slice | None, bool]]:
    """(our name, Hugging Face name, slice of the HF output axis, transpose?) for block i."""
    ours, hf = f"trf_blocks.{i}.", f"h.{i}."
    rows = [(ours + "norm1.scale", hf + "ln_1.weight", None, False), (ours + "norm1.shift", hf + "ln_1.bias", None, False)]
    for j, part in enumerate(("W_query", "W_key", "W_value")):
        cols = slice(j * emb, (j + 1) * emb)
        rows += [(ours + f"att.{part}.weight", hf + "attn.c_attn.weight", cols, True),
                 (ours + f"att.{part}.bias", hf + "attn.c_attn.bias", cols, False)]
    rows += [(ours + "att.out_proj.weight", hf + "attn.c_proj.weight", None, True),
             (ours + "att.out_proj.bias", hf + "attn.c_proj.bias", None, False),
             (ours + "norm2.scale", hf + "ln_2.weight", None, False), (ours + "norm2.shift", hf + "ln_2.bias", None, False),
             (ours + "ff.layers.0.weight", hf + "mlp.c_fc.weight", None, True), (ours + "ff.layers.0.bias", hf + "mlp.c_fc.bias", None, False),
             (ours + "ff.layers.2.weight", hf + "mlp.c_proj.weight", None, True), (ours + "ff.layers.2.bias", hf + "mlp.c_proj.bias", None, False)]
    return rows


def _hf_shape(shape: tuple[int, ...], cols: slice | None, transpose: bool) -> tuple[int, ...]:
    """The shape a tensor has in the HF file, given our parameter's shape."""
    shape = tuple(shape[::-1]) if transpose else tuple(shape)
    return shape if cols is None else shape[:-1] + (3 * shape[-1],)


def weight_map(cfg: dict) -> list[tuple[str, str, slice | None, bool]]:
    """The whole mapping for a config: (our name, HF name, HF output-axis slice, transpose?)."""
    head = [] if cfg.get("tie_weights", False) else [("out_head.weight", "lm_head.weight", None, False)]  # (V, E) both
    rows = head + [("tok_emb.weight", "wte.weight", None, False), ("pos_emb.weight", "wpe.weight", None, False)]
    for i in range(cfg["n_layers"]):
        rows += _block_map(i, cfg["emb_dim"])
    return rows + [("final_norm.scale", "ln_f.weight", None, False), ("final_norm.shift", "ln_f.bias", None, False)]


# transformers' GPT2Config defaults: a field missing from config.json has this value there, so here too.
_HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                "model_type": "gpt2", "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "add_cross_attention": False, "is_encoder_decoder": False, "tie_word_embeddings": True, "pruned_heads": {}}

# The tanh approximation of GELU, F.gelu, under each name transformers gives it ("gelu_fast" is the
# same formula with sqrt(2/pi) * (x + 0.044715 x^3) factored as x * (0.79788456 + 0.0356774 x^2)).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_SWITCHES = ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
             "is_encoder_decoder", "tie_word_embeddings")


def config_from_hf(hf: dict, drop_rate: float = 0.0, source: str = "config.json") -> dict:
    """Our GPT config for a Hugging Face GPT-2 config.json. Every field of GPT2Config that
    changes the forward pass is either honoured (the sizes, layer_norm_epsilon, the tanh-GELU
    names, tie_word_embeddings, reorder_and_upcast_attn) or refused with a ValueError naming
    the field and its value. The rest cannot change the logits and are accepted: dropout
    probabilities (drop_rate sets ours), token ids, architectures, summary_* (the heads of
    other GPT-2 classes), use_cache, torch_dtype, initializer_range, and fields transformers
    itself does not read (n_ctx is used only when n_positions is missing)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: expected a JSON object of GPT-2 settings, got {type(hf).__name__}")
    c = _HF_DEFAULTS | {"n_positions": hf.get("n_ctx", _HF_DEFAULTS["n_positions"])} | hf
    problems = _invalid(c) or _unsupported(c)
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return {"vocab_size": c["vocab_size"], "context_length": c["n_positions"], "emb_dim": c["n_embd"],
            "n_heads": c["n_head"], "n_layers": c["n_layer"], "drop_rate": drop_rate, "qkv_bias": True,
            "tie_weights": c["tie_word_embeddings"], "layer_norm_eps": float(c["layer_norm_epsilon"])}


def _invalid(c: dict) -> list[str]:
    """Values no GPT-2 can have, one phrase each."""
    problems = [f"{name} must be a positive integer, got {c[name]!r}" for name in _SIZES
                if isinstance(c[name], bool) or not isinstance(c[name], int) or c[name] <= 0]
    eps = c["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        problems.append(f"layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
    problems += [f"{name} must be true or false, got {c[name]!r}" for name in _SWITCHES if not isinstance(c[name], bool)]
    if not problems and c["n_embd"] % c["n_head"]:
        problems.append(f"n_head={c['n_head']} does not divide n_embd={c['n_embd']}")
    return problems


def _unsupported(c: dict) -> list[str]:
    """Fields whose value asks for math tinygpt does not compute, one phrase each.

    reorder_and_upcast_attn=True is accepted: it makes transformers compute q k^T and the softmax
    in float32 with the 1/sqrt(head_dim) folded into the product, which only matters for half
    precision weights; tinygpt's weights are float32 or float64 and attention runs in their dtype."""
    inner = 4 * c["n_embd"]
    rules = [
        ("model_type", c["model_type"] == "gpt2", "only GPT-2 checkpoints load"),
        ("activation_function", c["activation_function"] in TANH_GELUS,
         f"tinygpt's GELU is the tanh approximation: {', '.join(TANH_GELUS)}"),
        ("n_inner", c["n_inner"] in (None, inner), f"tinygpt's feed-forward width is 4 * n_embd = {inner}"),
        ("scale_attn_weights", c["scale_attn_weights"] is True, "tinygpt always scales attention by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", c["scale_attn_by_inverse_layer_idx"] is False,
         "tinygpt scales attention by 1/sqrt(head_dim) only"),
        ("add_cross_attention", c["add_cross_attention"] is False, "tinygpt's blocks have no cross-attention"),
        ("is_encoder_decoder", c["is_encoder_decoder"] is False, "GPT-2 is a decoder only"),
        ("pruned_heads", not c["pruned_heads"], "tinygpt's layers all have n_head heads"),
    ]
    return [f"{name}={c[name]!r} is not supported ({why})" for name, ok, why in rules if not ok]


def load_gpt2(name_or_dir: str | os.PathLike = "gpt2", device: str | None = None, drop_rate: float = 0.0,
              cache_dir: str | os.PathLike | None = None) -> GPTModel:
    """GPT-2 from a local Hugging Face-layout folder, or by name (gpt2, gpt2-medium, gpt2-large,
    gpt2-xl) from the Hugging Face Hub, downloaded once into cache_dir (default
    $TINYGPT_CACHE or ~/.cache/tinygpt). Tensors are copied in one at a time, so memory
    stays near the model's own size."""
    folder = Path(name_or_dir)
    if not folder.is_dir():
        if str(name_or_dir) not in GPT2_NAMES:
            raise FileNotFoundError(f"{name_or_dir} is neither a folder nor one of {', '.join(GPT2_NAMES)}")
        folder = download_gpt2(str(name_or_dir), cache_dir)
    for needed in ("config.json", "model.safetensors"):
        if not (folder / needed).exists():
            raise FileNotFoundError(f"{folder} has no {needed}: expected a Hugging Face GPT-2 folder")
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), drop_rate, source=str(folder / "config.json"))
    with backend.device_scope(device):
        model = GPTModel(cfg)
    _copy_weights(model, folder / "model.safetensors")
    return model.eval()


def _copy_weights(model: GPTModel, path: Path) -> None:
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="numpy") as f:
        names = {k.removeprefix("transformer."): k for k in f.keys()}
        mapping = weight_map(model.cfg)
        wanted = {hf for _, hf, _, _ in mapping}
        problems = [f"missing {hf}" for hf in sorted(wanted - names.keys())]
        problems += [f"unexpected {k}" for k in sorted(names.keys() - wanted)  # a tied lm_head copies wte
                     if not k.endswith(_BUFFERS) and k != "lm_head.weight"]
        for ours, hf, cols, transpose in mapping:
            if hf in names:
                expected = _hf_shape(params[ours].shape, cols, transpose)
                got = tuple(f.get_slice(names[hf]).get_shape())
                if got != expected:
                    problems.append(f"{hf} has shape {got}, expected {expected}")
        if problems:
            raise ValueError(f"{path} does not fit this GPT-2 config: " + "; ".join(sorted(set(problems))))
        for ours, hf, cols, transpose in mapping:
            array = f.get_tensor(names[hf])
            if cols is not None:
                array = array[..., cols]
            p = params[ours]
            p.data = backend.make_array(np.ascontiguousarray(array.T if transpose else array), dtype=p.dtype, device=p.device)


HF_FILES = {"config.json", "model.safetensors"}  # what save_gpt2 writes, and may replace


def save_gpt2(model: GPTModel, out_dir: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder (model.safetensors + config.json) that
    load_gpt2 and transformers' GPT2LMHeadModel can read. A model whose out_head is not
    tok_emb's weight is written with lm_head.weight and tie_word_embeddings false; a classifier
    (num_classes) is refused, GPT-2's layout has no place for its head. The folder is written
    under a temporary name and renamed into place."""
    cfg = model.cfg
    if cfg.get("num_classes"):
        raise ValueError(f"this model is a classifier (num_classes={cfg['num_classes']}); GPT-2's layout holds "
                         "only a next-token head over the vocabulary")
    tied = model.out_head.weight is model.tok_emb.weight
    cfg = {**cfg, "tie_weights": tied}
    params = dict(model.named_parameters())
    tensors: dict[str, np.ndarray] = {}
    for ours, hf, cols, transpose in weight_map(cfg):
        array = params[ours].numpy() if ours in params else np.zeros(cfg["emb_dim"], dtype=np.float32)  # no qkv bias: zeros
        array = array.T if transpose else array
        if cols is None:
            tensors[hf] = np.ascontiguousarray(array)
        else:  # reassemble c_attn from the three parts
            tensors.setdefault(hf, np.zeros(array.shape[:-1] + (3 * cfg["emb_dim"],), dtype=array.dtype))[..., cols] = array
    if not tied:  # transformers reads lm_head.weight only beside "transformer."-prefixed names, as it saves them
        tensors = {k if k == "lm_head.weight" else "transformer." + k: v for k, v in tensors.items()}
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg["vocab_size"],
                 "n_positions": cfg["context_length"], "n_ctx": cfg["context_length"], "n_embd": cfg["emb_dim"],
                 "n_layer": cfg["n_layers"], "n_head": cfg["n_heads"],
                 "layer_norm_epsilon": cfg.get("layer_norm_eps", 1e-5), "tie_word_embeddings": tied,
                 "activation_function": "gelu_new", "resid_pdrop": cfg["drop_rate"], "embd_pdrop": cfg["drop_rate"],
                 "attn_pdrop": cfg["drop_rate"]}
    if cfg["vocab_size"] > 50256:  # GPT-2's <|endoftext|>, only where the vocabulary has it
        hf_config.update(bos_token_id=50256, eos_token_id=50256)
    out = Path(out_dir)
    files.check_replaceable(out, HF_FILES)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.make_temp_dir(out.parent, prefix=f".tmp-{out.name}-")
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files.give_umask_mode(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        files.replace_folder(tmp, out, HF_FILES)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def download_gpt2(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch config.json and model.safetensors of a GPT-2 size from the Hugging Face Hub into
    the cache (once), with a progress bar; each file is downloaded to a temporary name and
    renamed when complete."""
    from tqdm import tqdm

    if name not in GPT2_NAMES:
        raise ValueError(f"unknown GPT-2 size {name!r}; expected one of {', '.join(GPT2_NAMES)}")
    folder = Path(cache_dir or os.environ.get("TINYGPT_CACHE", Path.home() / ".cache" / "tinygpt")) / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        target = folder / file
        if target.exists():
            continue
        url = _HUB.format(name=name, file=file)
        tmp = target.with_suffix(target.suffix + ".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length", 0)) or None
                received = 0
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}/{file}") as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            if total is not None and received != total:  # a closed connection reads as a normal end
                raise OSError(f"the connection closed after {received:,} of {total:,} bytes")
            tmp.replace(target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RunError(f"could not download {url} ({e}); without network, pass a local folder holding "
                           f"config.json and model.safetensors instead of {name!r}") from e
    return folder


def load_model_and_tokenizer(source: str | os.PathLike, device: str | None = None, bpe_file: str | os.PathLike | None = None):
    """(model, tokenizer) to start finetuning from: a GPT-2 size by name, a Hugging Face
    GPT-2 folder (config.json with "n_embd"), a Hugging Face Llama, Qwen3 or Mistral folder
    (hf_llama.py, with its tokenizer.json), or a run or checkpoint of `tinygpt train`."""
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.data import gpt2_tokenizer
    from tinygpt.hf_llama import is_llama_folder, load_llama
    from tinygpt.hf_tokenizer import load_hf_tokenizer

    folder = Path(source)
    if is_llama_folder(folder):  # model_type llama, qwen3 or mistral: LlamaModel and tokenizer.json
        return load_llama(folder, device=device), load_hf_tokenizer(folder)
    is_hf_folder = (folder / "config.json").exists() and "n_embd" in json.loads((folder / "config.json").read_text())
    if str(source) in GPT2_NAMES or is_hf_folder:
        return load_gpt2(source, device=device), gpt2_tokenizer(bpe_file)
    if not folder.exists():
        raise FileNotFoundError(f"{source} is neither one of {', '.join(GPT2_NAMES)} nor a folder")
    checkpoint = load_checkpoint(folder, device=device, bpe_file=bpe_file, optimizer=False)  # weights only
    return checkpoint.model, checkpoint.tokenizer
