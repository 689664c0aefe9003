"""Layer by layer against transformers: where does my model first compute something else?

`compare(model, hf_model, ids)` runs a tinygpt model (GPTModel or LlamaModel) and its
transformers counterpart on the same token ids, records every module's output on both sides
(and, with backward=True, the gradient of a next-token cross-entropy loss with respect to each
output), and lists them in the order tinygpt computed them with the largest absolute
difference, stopping at the first module whose difference is beyond the dtype's tolerance:
the place to start reading. Modules are paired by name (NAME_MAPS); a module with no
counterpart (GPT-2's fused c_attn has none for W_query) is left out.

    report = tg.compare(model, hf_model, ids)        # prints nothing
    print(report.table()); report.first_divergence   # a Row, or None when all agree

The command line: tinygpt compare --hf FOLDER [--prompt TEXT] [--backward].
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from tinygpt import backend
from tinygpt import functional as F
from tinygpt.tensor import Tensor

INSTALL = 'pip install -e ".[reference]" (or: pip install torch transformers)'
# max |ours - theirs| allowed, relative to max(1, max |theirs|) of the compared output
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}

# our module path -> transformers' (regex substitutions, applied in order; the first match wins)
NAME_MAPS = {
    "llama": [(r"^tok_emb$", "model.embed_tokens"), (r"^final_norm$", "model.norm"), (r"^out_head$", "lm_head"),
              (r"^trf_blocks\.(\d+)$", r"model.layers.\1"),
              (r"^trf_blocks\.(\d+)\.norm1$", r"model.layers.\1.input_layernorm"),
              (r"^trf_blocks\.(\d+)\.norm2$", r"model.layers.\1.post_attention_layernorm"),
              (r"^trf_blocks\.(\d+)\.att$", r"model.layers.\1.self_attn"),
              (r"^trf_blocks\.(\d+)\.att\.W_query$", r"model.layers.\1.self_attn.q_proj"),
              (r"^trf_blocks\.(\d+)\.att\.W_key$", r"model.layers.\1.self_attn.k_proj"),
              (r"^trf_blocks\.(\d+)\.att\.W_value$", r"model.layers.\1.self_attn.v_proj"),
              (r"^trf_blocks\.(\d+)\.att\.out_proj$", r"model.layers.\1.self_attn.o_proj"),
              (r"^trf_blocks\.(\d+)\.att\.([qk])_norm$", r"model.layers.\1.self_attn.\2_norm"),
              (r"^trf_blocks\.(\d+)\.ff$", r"model.layers.\1.mlp"),
              (r"^trf_blocks\.(\d+)\.ff\.fc1$", r"model.layers.\1.mlp.gate_proj"),
              (r"^trf_blocks\.(\d+)\.ff\.fc2$", r"model.layers.\1.mlp.up_proj"),
              (r"^trf_blocks\.(\d+)\.ff\.fc3$", r"model.layers.\1.mlp.down_proj")],
    "gpt2": [(r"^tok_emb$", "transformer.wte"), (r"^pos_emb$", "transformer.wpe"), (r"^final_norm$", "transformer.ln_f"),
             (r"^out_head$", "lm_head"), (r"^trf_blocks\.(\d+)$", r"transformer.h.\1"),
             (r"^trf_blocks\.(\d+)\.norm1$", r"transformer.h.\1.ln_1"), (r"^trf_blocks\.(\d+)\.norm2$", r"transformer.h.\1.ln_2"),
             (r"^trf_blocks\.(\d+)\.att$", r"transformer.h.\1.attn"),
             (r"^trf_blocks\.(\d+)\.att\.out_proj$", r"transformer.h.\1.attn.c_proj"),
             (r"^trf_blocks\.(\d+)\.ff$", r"transformer.h.\1.mlp"),
             (r"^trf_blocks\.(\d+)\.ff\.layers\.0$", r"transformer.h.\1.mlp.c_fc"),
             (r"^trf_blocks\.(\d+)\.ff\.layers\.1$", r"transformer.h.\1.mlp.act"),
             (r"^trf_blocks\.(\d+)\.ff\.layers\.2$", r"transformer.h.\1.mlp.c_proj")],
}


@dataclass
class Row:
    phase: str           # "forward": the module's output; "backward": the loss's gradient there
    module: str          # our module path
    hf_module: str
    shape: tuple
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class CompareReport:
    rows: list[Row] = field(default_factory=list)
    dtype: str = "float32"

    @property
    def first_divergence(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    def table(self) -> str:
        width = max([len(r.module) for r in self.rows] + [6])
        lines = [f"{'phase':<9}{'module':<{width + 2}}{'shape':<18}{'max |diff|':>12}{'tolerance':>12}"]
        for r in self.rows:
            mark = "" if r.ok else "   <- first divergence"
            lines.append(f"{r.phase:<9}{r.module:<{width + 2}}{str(r.shape).replace(' ', ''):<18}"
                         f"{r.max_abs_diff:>12.2e}{r.tolerance:>12.1e}{mark}")
        first = self.first_divergence
        lines.append(f"all {len(self.rows)} compared outputs agree within the {self.dtype} tolerance" if first is None else
                     f"{first.module} ({first.hf_module} in transformers) differs by {first.max_abs_diff:.3g} in its "
                     f"{'output' if first.phase == 'forward' else 'gradient'}: everything before it agrees")
        return "\n".join(lines)


def _family(model) -> str:
    from tinygpt.llama import LlamaModel

    return "llama" if isinstance(model, LlamaModel) else "gpt2"


def hf_name(path: str, family: str) -> str | None:
    for pattern, replacement in NAME_MAPS[family]:
        if re.match(pattern, path):
            return re.sub(pattern, replacement, path)
    return None


# modules whose input transformers holds as [B, T, H, D] and tinygpt as [B, H, T, D]
HEADS_SECOND = re.compile(r"\.att\.[qk]_norm$")


def _align(path: str, ours: np.ndarray, theirs: np.ndarray) -> np.ndarray | None:
    """theirs in our layout: heads and tokens swapped for QK-norm ([B,T,H,D] against our
    [B,H,T,D]; by name, since T may equal H), size-1 axes added (GPT-2's position embedding
    of [1, T, C] against our [T, C]); None when the shapes cannot be matched."""
    if HEADS_SECOND.search(path) and theirs.ndim == 4:
        theirs = theirs.transpose(0, 2, 1, 3)
    if theirs.shape == ours.shape:
        return theirs
    if theirs.size == ours.size and tuple(d for d in theirs.shape if d > 1) == tuple(d for d in ours.shape if d > 1):
        return theirs.reshape(ours.shape)
    return None


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _run_ours(model, ids, family, backward):
    """(outputs, gradients): {path: host array} in the order computed."""
    outputs, grads, handles = {}, {}, []

    def watch(path):
        def hook(module, inputs, output):
            outputs[path] = backend.to_host(output.data).astype(np.float64)
            if backward and output.requires_grad:
                output.register_hook(lambda g: grads.__setitem__(path, backend.to_host(g.data).astype(np.float64)))
        return hook

    for path, module in model.named_modules():
        if path and hf_name(path, family):
            handles.append(module.register_forward_hook(watch(path)))
    try:
        logits = model(ids)
        if backward:
            v = logits.shape[-1]
            F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1)).backward()
    finally:
        for h in handles:
            h.remove()
    return outputs, grads


def _run_theirs(hf_model, ids, names, backward):
    import torch

    outputs, grads, handles = {}, {}, []
    modules = dict(hf_model.named_modules())

    def watch(name):
        def hook(module, inputs, output):
            out = _first(output)
            outputs[name] = out.detach().double().numpy()
            if backward and out.requires_grad:
                out.register_hook(lambda g: grads.__setitem__(name, g.detach().double().numpy()))
        return hook

    handles = [modules[n].register_forward_hook(watch(n)) for n in names if n in modules]
    try:
        with torch.set_grad_enabled(backward):
            logits = hf_model(torch.from_numpy(np.asarray(ids))).logits
            if backward:
                v = logits.shape[-1]
                torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), torch.from_numpy(ids[:, 1:]).reshape(-1)).backward()
    finally:
        for h in handles:
            h.remove()
    return outputs, grads


def _rows(phase, ours, theirs, family, tolerance, order) -> list[Row]:
    rows = []
    for path in order:
        name = hf_name(path, family)
        if path not in ours or name not in theirs:
            continue
        aligned = _align(path, ours[path], theirs[name])
        diff = float("inf") if aligned is None else float(np.abs(ours[path] - aligned).max(initial=0.0))
        scale = 1.0 if aligned is None else max(1.0, float(np.abs(aligned).max(initial=0.0)))
        rows.append(Row(phase, path, name, tuple(ours[path].shape), diff, tolerance * scale))
        if not rows[-1].ok:
            break
    return rows


def compare(model, hf_model, ids, backward: bool = False) -> CompareReport:
    """Run both models on ids (B, T), compare every paired module's output (and gradient with
    backward=True) in the order tinygpt ran them; stop at the first beyond tolerance."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError(f"compare needs PyTorch and transformers: {INSTALL}") from None
    ids = ids.data if isinstance(ids, Tensor) else ids
    ids = backend.to_host(ids) if backend.is_array(ids) else np.asarray(ids)  # host ids: torch reads them from here
    family = _family(model)
    dtype = np.dtype(model.tok_emb.weight.dtype)
    tolerance = TOLERANCE.get(dtype, 1e-4)
    ours, our_grads = _run_ours(model, backend.to_device(ids, model.tok_emb.weight.device), family, backward)
    names = [hf_name(p, family) for p in ours]
    theirs, their_grads = _run_theirs(hf_model, ids, names, backward)
    report = CompareReport(_rows("forward", ours, theirs, family, tolerance, list(ours)), dtype.name)
    if backward and report.first_divergence is None:
        report.rows += _rows("backward", our_grads, their_grads, family, tolerance, list(our_grads))
    return report


# ------------------------------------------------------------------ tinygpt compare


def run_compare(args) -> int:
    """Load FOLDER into tinygpt and into transformers, compare on the prompt, print the table;
    exit 0 when every output (and gradient) agrees, 1 at a divergence."""
    from pathlib import Path

    from tinygpt.generate import text_to_token_ids
    from tinygpt.pretrained import load_model_and_tokenizer
    from tinygpt.validation import UsageError

    try:
        import torch
        import transformers
    except ImportError:
        raise UsageError(f"tinygpt compare needs PyTorch and transformers: {INSTALL}") from None
    if not (Path(args.hf) / "config.json").exists():
        raise UsageError(f"--hf {args.hf} has no config.json: expected a Hugging Face model folder")
    model, tokenizer = load_model_and_tokenizer(args.hf, device="cpu")
    ids = text_to_token_ids(args.prompt, tokenizer, device="cpu")
    if ids.shape[1] < 2 and args.backward:
        raise UsageError("--backward needs a prompt of at least 2 tokens (the loss predicts each next token)")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    report = compare(model, hf_model, ids, backward=args.backward)
    print(f"{args.hf}: {ids.shape[1]} tokens, float32; max |diff| per module in the order tinygpt runs them")
    print(report.table())
    return 0 if report.first_divergence is None else 1


def add_command(sub) -> None:
    p = sub.add_parser("compare", help="run a Hugging Face folder in tinygpt and in transformers, module by module, "
                                       "and show where they first differ (needs transformers)")
    p.add_argument("--hf", required=True, metavar="FOLDER", help="a Hugging Face GPT-2, Llama, Qwen3 or Mistral folder")
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog")
    p.add_argument("--backward", action="store_true", help="also compare the gradients of a next-token loss")
    p.set_defaults(run=run_compare)
