"""Checkpoints: everything needed to resume a training run exactly, or to sample from it.

A run directory holds numbered checkpoints and a `latest` file naming the newest:

    RUN/latest                          "checkpoints/step_000120"
    RUN/checkpoints/step_000120/
        model.safetensors               the model's state_dict (book names)
        config.json                     the GPT config
        tokenizer.json                  the tokenizer (characters, BPE merges, or "gpt2")
        optimizer.safetensors           AdamW's running means m and v, per parameter
        trainer_state.json              step, tokens seen, loader position, RNG state, loss
                                        history, AdamW's step counts and hyperparameters

Each checkpoint is written into a temporary directory and renamed into place, and `latest`
is replaced atomically, so an interrupted write never leaves a broken checkpoint behind a
real name: the previous one stays valid.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file, save_file

from tinygpt import backend
from tinygpt.data import save_tokenizer, load_tokenizer
from tinygpt.files import atomic_write_text
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW


@dataclass
class Checkpoint:
    path: Path
    model: GPTModel
    tokenizer: Any
    trainer_state: dict | None
    optimizer_state: dict | None  # AdamW.state_dict() layout, arrays on the host


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: GPTModel, tokenizer: Any,
                    optimizer: AdamW | None = None, trainer_state: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` under run_dir/checkpoints, point run_dir/latest at it, and
    delete all but the newest `keep` checkpoints."""
    run_dir = Path(run_dir)
    parent = run_dir / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step_{step:06d}"
    if not final.exists():
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{final.name}-"))
        try:
            _write(tmp, model, tokenizer, optimizer, trainer_state)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    atomic_write_text(run_dir / "latest", f"checkpoints/{final.name}\n")
    for old in sorted((p for p in parent.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(folder: Path, model: GPTModel, tokenizer: Any, optimizer: AdamW | None, trainer_state: dict | None) -> None:
    weights = {name: backend.to_host(t.data) for name, t in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.cfg, indent=2))
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    state = dict(trainer_state or {})
    if optimizer is not None:
        opt = optimizer.state_dict()
        arrays = {f"{i}.{k}": backend.to_host(s[k]) for i, s in opt["state"].items() for k in ("m", "v")}
        save_file(arrays, str(folder / "optimizer.safetensors"))
        state["optimizer"] = {"param_groups": opt["param_groups"], "steps": {str(i): s["step"] for i, s in opt["state"].items()}}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or a run directory whose `latest` names one."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    if (path / "latest").exists():
        return path / (path / "latest").read_text().strip()
    raise FileNotFoundError(f"no checkpoint in {path}: expected model.safetensors or a 'latest' file there")


def load_checkpoint(path: str | os.PathLike, device: str | None = None, bpe_file: str | os.PathLike | None = None) -> Checkpoint:
    """The model (on `device`), tokenizer and saved training state of a checkpoint."""
    folder = resolve_checkpoint(path)
    config = json.loads((folder / "config.json").read_text())
    with backend.device_scope(device):
        model = GPTModel(config)
        if "lora" in config:  # saved while finetuning with LoRA: the same adapters, then their weights
            from tinygpt.finetune.lora import replace_linear_with_lora

            replace_linear_with_lora(model, **config["lora"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    trainer_state = json.loads((folder / "trainer_state.json").read_text()) if (folder / "trainer_state.json").exists() else None
    optimizer_state = None
    if trainer_state and "optimizer" in trainer_state and (folder / "optimizer.safetensors").exists():
        arrays = load_file(str(folder / "optimizer.safetensors"))
        saved = trainer_state["optimizer"]
        optimizer_state = {"param_groups": saved["param_groups"],
                           "state": {int(i): {"step": step, "m": arrays[f"{i}.m"], "v": arrays[f"{i}.v"]}
                                     for i, step in saved["steps"].items()}}
    return Checkpoint(folder, model, load_tokenizer(folder / "tokenizer.json", bpe_file), trainer_state, optimizer_state)
