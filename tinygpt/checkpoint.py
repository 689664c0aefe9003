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
        manifest.json                   each file above with its size and sha256

Each checkpoint is written into a temporary directory and renamed into place, and `latest`
is replaced atomically, so an interrupted write never leaves a broken checkpoint behind a
real name: the previous one stays valid. The manifest is written last, and every load checks
each file against it, so a file truncated, corrupted or edited afterwards is an error that
names the file, never a model that silently computes something else. Weights and optimizer
state are checked finite before anything is written: a checkpoint on disk is a good one.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from tinygpt import backend
from tinygpt.data import load_tokenizer, save_tokenizer
from tinygpt.errors import RunError
from tinygpt.files import atomic_write_text, give_umask_mode, make_temp_dir, sha256_file
from tinygpt.llama import LlamaModel
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW
from tinygpt.validation import UsageError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = {"format": "tinygpt-checkpoint", "version": 1}


class CheckpointError(RunError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


class NonFiniteError(ValueError):
    """Weights or optimizer state hold NaN or infinity: nothing was written."""


@dataclass
class Checkpoint:
    path: Path
    model: GPTModel
    tokenizer: Any
    trainer_state: dict | None
    optimizer_state: dict | None  # AdamW.state_dict() layout, arrays on the host

    @property
    def kind(self) -> str:
        """"classifier" (from finetune-classify: class logits) or "language model" (next-token logits)."""
        return "classifier" if self.model.cfg.get("num_classes") else "language model"

    @property
    def task(self) -> str | None:
        """The finetuning task that wrote it ("classify", "instruct"), None for `tinygpt train`."""
        return ((self.trainer_state or {}).get("meta") or {}).get("task")


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: GPTModel, tokenizer: Any,
                    optimizer: AdamW | None = None, trainer_state: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` under run_dir/checkpoints, point run_dir/latest at it, and
    delete all but the newest `keep` checkpoints. Refuses (NonFiniteError) to write
    non-finite weights or optimizer state, and (FileExistsError) to replace a checkpoint."""
    weights = {name: backend.to_host(t.data) for name, t in model.state_dict().items()}
    opt = optimizer.state_dict() if optimizer is not None else None
    arrays = {f"{i}.{k}": backend.to_host(s[k]) for i, s in opt["state"].items() for k in ("m", "v")} if opt else {}
    for what, named in (("weight", weights), ("optimizer state", arrays)):
        bad = first_non_finite(named)
        if bad is not None:
            raise NonFiniteError(f"{what} {bad} holds non-finite values (NaN or inf) at step {step}: no checkpoint was written")
    run_dir = Path(run_dir)
    parent = run_dir / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step_{step:06d}"
    if final.exists():
        raise FileExistsError(f"{final} already exists; refusing to replace it with another step {step}")
    tmp = make_temp_dir(parent, prefix=f".tmp-{final.name}-")
    try:
        _write(tmp, weights, model.cfg, tokenizer, opt, arrays, trainer_state)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise OSError(f"could not write checkpoint {final} ({e}); {kept}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(run_dir / "latest", f"checkpoints/{final.name}\n")
    for old in checkpoints(run_dir)[:-keep]:
        # renamed out of the way first: a kill during the deletion must not leave a half-deleted
        # checkpoint under its real name (the temporary name is cleaned at the next start)
        doomed = old.with_name(f".tmp-{old.name}-deleting")
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def first_non_finite(named_arrays: dict) -> str | None:
    """The name of the first array holding NaN or inf (host arrays), else None."""
    import numpy as np

    for name, array in named_arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return name
    return None


def _write(folder: Path, weights: dict, cfg: dict, tokenizer: Any, opt: dict | None, arrays: dict,
           trainer_state: dict | None) -> None:
    _save_arrays(weights, folder / "model.safetensors")
    _write_file(folder / "config.json", lambda path: path.write_text(json.dumps(cfg, indent=2)))
    _write_file(folder / "tokenizer.json", lambda path: save_tokenizer(tokenizer, path))
    state = dict(trainer_state or {})
    state.pop("optimizer", None)  # only the optimizer written here may be described
    if opt is not None:
        _save_arrays(arrays, folder / "optimizer.safetensors")
        state["optimizer"] = {"param_groups": opt["param_groups"], "steps": {str(i): s["step"] for i, s in opt["state"].items()}}
    _write_file(folder / "trainer_state.json", lambda path: path.write_text(json.dumps(state)))
    files = {}
    for path in sorted(folder.iterdir()):
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        _fsync(path)  # on disk before the rename makes the checkpoint visible
    manifest = json.dumps({**MANIFEST_FORMAT, "files": files}, indent=1)
    _write_file(folder / MANIFEST, lambda path: path.write_text(manifest))  # last: its presence means complete
    _fsync(folder / MANIFEST)


def _save_arrays(arrays: dict, path: Path) -> None:
    """save_file, whose I/O failures (a full disk) arrive as SafetensorError: an OSError naming the
    file; the file gets the mode open() would give."""
    def save(path: Path) -> None:
        try:
            save_file(arrays, str(path))
        except SafetensorError as e:
            raise OSError(str(e).replace("Error while serializing: ", "")) from None
        give_umask_mode(path)  # save_file makes it 0600: another user of the run could not read it
    _write_file(path, save)


def _write_file(path: Path, write) -> None:
    """write(path), a failure named by the file's name alone: the folder is a temporary one, and
    save_checkpoint's message names the checkpoint."""
    try:
        write(path)
    except OSError as e:
        raise OSError(f"{path.name}: {os.strerror(e.errno) if e.errno else e}") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ finding and checking

def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of a run, oldest first (temporary folders excluded)."""
    parent = Path(run_dir) / "checkpoints"
    found = [p for p in parent.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if parent.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def step_of(folder: str | os.PathLike) -> int:
    return int(Path(folder).name[5:])


def run_dir_of(folder: str | os.PathLike) -> Path:
    """The run directory of a checkpoint folder (RUN/checkpoints/step_N -> RUN)."""
    return Path(folder).parent.parent


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory (the
    newest folder, which `latest` names unless a crash came between the two)."""
    path = Path(path)
    if (path / "model.safetensors").exists() or (path / MANIFEST).exists():
        return path
    found = checkpoints(path)
    if found:
        return found[-1]
    if (path / "latest").exists():
        return path / (path / "latest").read_text().strip()
    raise FileNotFoundError(f"no checkpoint in {path}: expected model.safetensors or a 'latest' file there")


def verify_checkpoint(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a checkpoint's files, checked against its manifest (None: all
    intact). A checkpoint written before manifests existed is checked for its files only."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        missing = [n for n in ("model.safetensors", "config.json", "tokenizer.json") if not (folder / n).exists()]
        return f"{folder / missing[0]} is missing" if missing else None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"{folder / MANIFEST} is unreadable ({e})"
    for name, expected in files.items():
        path = folder / name
        if name in skip:
            continue
        if not path.exists():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size:,} bytes but the manifest says {expected['size']:,} (truncated or replaced)"
        if sha256_file(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupted or edited)"
    return None


def newest_intact(run_dir: str | os.PathLike, exclude: Path | None = None) -> Path | None:
    for folder in reversed(checkpoints(run_dir)):
        if folder != exclude and verify_checkpoint(folder) is None:
            return folder
    return None


def _broken(folder: Path, problem: str, remedy: str = "") -> CheckpointError:
    other = newest_intact(run_dir_of(folder), exclude=folder)
    hint = f"; the newest intact checkpoint of this run is {other}" if other else "; this run has no other intact checkpoint"
    return CheckpointError(f"checkpoint {folder} cannot be used: {problem}{remedy}{hint}")


# ------------------------------------------------------------------ loading

# How to rebuild a model that was changed after it was built, by the key its config holds:
# rebuild(model, **config[key]) runs on the new model before its weights are loaded.
# Finetuning fills it at import (tinygpt.finetune registers "lora"): this layer knows no finetuning.
MODEL_CHANGES: dict[str, Callable] = {}


def register_model_change(key: str, rebuild: Callable) -> None:
    """Let load_checkpoint rebuild models whose config.json holds `key` (see MODEL_CHANGES)."""
    MODEL_CHANGES[key] = rebuild


def _check_changes_registered(folder: Path, model, weights: dict) -> None:
    """A clear error for weights the built model lacks because the change that made them
    (e.g. LoRA adapters) was never registered in this process."""
    names = dict(model.named_parameters(remove_duplicate=False))  # a tied out_head.weight is saved too
    extra = [name for name in weights if name not in names]
    if extra:
        raise CheckpointError(f"checkpoint {folder}: model.safetensors holds {len(extra)} weights the model built from "
                              f"config.json lacks (first: {extra[0]}): it was saved from a model changed after it was "
                              f"built, and nothing in this process registered how to rebuild it (a LoRA-finetuned "
                              f"model: import tinygpt.finetune before loading)")


def load_language_model(path, device: str | None, bpe_file, command: str) -> Checkpoint:
    """The checkpoint of a model that predicts next tokens, for `tinygpt generate`, `chat` and
    `trace`; a classifier (from finetune-classify) is refused, since its logits are labels."""
    checkpoint = load_checkpoint(path, device=device, bpe_file=bpe_file, optimizer=False)
    if checkpoint.kind == "classifier":
        labels = ((checkpoint.trainer_state or {}).get("meta") or {}).get("labels")
        raise UsageError(f"{checkpoint.path} is a classifier (labels {labels}), not a language model: `tinygpt {command}` "
                         f"cannot generate text from it; label texts with `tinygpt classify --checkpoint {path} TEXT`")
    return checkpoint


def load_checkpoint(path: str | os.PathLike, device: str | None = None, bpe_file: str | os.PathLike | None = None,
                    optimizer: bool = True) -> Checkpoint:
    """The model (on `device`), tokenizer and saved training state of a checkpoint, each
    file checked against the manifest first. optimizer=False skips AdamW's state (for
    sampling, or to restart it); otherwise a checkpoint saved with an optimizer must have it."""
    folder = resolve_checkpoint(path)
    skip = () if optimizer else ("optimizer.safetensors",)
    problem = verify_checkpoint(folder, skip)
    if problem:
        remedy = ("; resume with --reset-optimizer to restart AdamW's running averages from zero "
                  "(the run then no longer matches a straight run bit for bit)") if "optimizer.safetensors" in problem else ""
        raise _broken(folder, problem, remedy)
    if not (folder / MANIFEST).exists():
        print(f"warning: {folder} has no manifest (written by an older tinygpt): its files cannot be verified", file=sys.stderr)
    config, trainer_state = _read_json(folder, "config.json"), None
    if (folder / "trainer_state.json").exists():
        trainer_state = _read_json(folder, "trainer_state.json")
    try:
        with backend.device_scope(device):
            model = (LlamaModel if config.get("arch") == "llama" else GPTModel)(config)
            for key, rebuild in MODEL_CHANGES.items():  # e.g. LoRA's adapters: the same change, then its weights
                if key in config:
                    rebuild(model, **config[key])
        weights = load_file(str(folder / "model.safetensors"))
        bad = first_non_finite(weights)
        if bad is not None:
            raise _broken(folder, f"weight {bad} in model.safetensors holds NaN or inf")
        _check_changes_registered(folder, model, weights)
        model.load_state_dict(weights)
    except CheckpointError:
        raise
    except Exception as e:  # a file that passed no manifest check (older checkpoints): say which
        raise _broken(folder, f"model.safetensors and config.json do not make a model ({type(e).__name__}: {e})") from e
    return Checkpoint(folder, model, load_tokenizer(folder / "tokenizer.json", bpe_file), trainer_state,
                      _optimizer_state(folder, trainer_state) if optimizer else None)


def _read_json(folder: Path, name: str) -> dict:
    try:
        value = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _broken(folder, f"{name} is unreadable ({e})") from e
    if not isinstance(value, dict):
        raise _broken(folder, f"{name} holds a {type(value).__name__}, not a JSON object")
    return value


def _optimizer_state(folder: Path, trainer_state: dict | None) -> dict | None:
    if not trainer_state or "optimizer" not in trainer_state:
        return None
    path = folder / "optimizer.safetensors"
    if not path.exists():
        raise _broken(folder, f"{path} is missing", "; resume with --reset-optimizer to restart AdamW from zero")
    try:
        arrays = load_file(str(path))
        saved = trainer_state["optimizer"]
        return {"param_groups": saved["param_groups"],
                "state": {int(i): {"step": step, "m": arrays[f"{i}.m"], "v": arrays[f"{i}.v"]}
                          for i, step in saved["steps"].items()}}
    except Exception as e:
        raise _broken(folder, f"{path} is unreadable ({type(e).__name__}: {e})",
                      "; resume with --reset-optimizer to restart AdamW from zero") from e
