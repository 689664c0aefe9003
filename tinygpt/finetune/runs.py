"""Starting and resuming a finetuning run: its settings (the checkpoint's meta), what
--resume may change and what it refuses, the data's identity, and the training call.

Everything a run needs to rebuild its data and its frozen layers (file, columns, split,
labels, LoRA) is kept in the checkpoint's `meta`, so `--resume DIR` needs no other option.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt import validation as v
from tinygpt.validation import UsageError

BOOK = {"lr": 5e-5, "weight_decay": 0.1, "batch_size": 8}  # chapters 6 and 7
# Defaults of a new run; the options default to None so that --resume can tell which were given
NEW_RUN = {**BOOK, "lora_alpha": 16.0, "eval_iter": 5, "checkpoint_every": 200, "seed": 123}
# TrainConfig fields that --resume may change (same names as the options)
RESUMABLE = ("epochs", "max_steps", "lr", "eval_freq", "eval_iter", "checkpoint_every", "sample_tokens")


@dataclass
class Start:
    """A new or resumed finetuning run, before its data is read."""
    model: Any
    tokenizer: Any
    settings: dict            # saved as the checkpoint's meta: all a run needs to rebuild its data
    run_dir: Path
    checkpoint: Any = None    # the checkpoint resumed from, or None for a new run
    branched: bool = False    # resumed into another run directory (--out)
    data_changed: bool = False  # resumed on other data (--data)


def start_run(args, task: str) -> Start:
    import tinygpt as tg
    from tinygpt.pretrained import load_model_and_tokenizer
    from tinygpt.rundir import data_identity

    tg.manual_seed(args.seed if args.seed is not None else NEW_RUN["seed"])
    if args.resume:
        return _resume(args, task)
    for key, value in NEW_RUN.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    model, tokenizer = load_model_and_tokenizer(args.init, device=args.device, bpe_file=args.bpe_file)
    if model.cfg.get("num_classes"):
        raise UsageError(f"--init {args.init} is a classifier, not a language model; start from a model that predicts "
                         f"tokens (gpt2, a Hugging Face folder, or a `tinygpt train` run)")
    init = Path(args.init).resolve() if Path(args.init).exists() else args.init  # absolute: resumable from anywhere
    settings = {"task": task, "init": str(init), "data": str(Path(args.data).resolve()), "data_identity": data_identity(args.data),
                "seed": args.seed, "batch_size": args.batch_size,
                "lora": None if args.lora_rank is None else {"rank": args.lora_rank, "alpha": args.lora_alpha}}
    return Start(model, tokenizer, settings, Path(args.out))


def _resume(args, task: str) -> Start:
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.rundir import check_same_data, data_identity, resume_target

    checkpoint = load_checkpoint(args.resume, device=args.device, bpe_file=args.bpe_file, optimizer=not args.reset_optimizer)
    settings = dict((checkpoint.trainer_state or {}).get("meta", {}))
    if settings.get("task") != task:
        other = f"tinygpt finetune-{settings['task']}" if settings.get("task") else "tinygpt train"
        what = f"its task is {settings['task']!r}" if settings.get("task") else "it was written by `tinygpt train`"
        raise UsageError(f"{args.resume} is not a {task} run ({what}); continue it with: {other} --resume {args.resume}")
    run_dir, branched = resume_target(checkpoint.path, checkpoint.trainer_state["step"], args.out)
    lora = settings.get("lora") or {}
    v.check_fixed_on_resume(args, {"batch_size": settings["batch_size"], "seed": settings["seed"],
                                   "weight_decay": checkpoint.trainer_state["config"]["weight_decay"],
                                   "lora_rank": lora.get("rank"), "lora_alpha": lora.get("alpha"),
                                   **{key: _saved_option(settings, key) for key in _FIXED[task]}})
    if args.init is not None and str(Path(args.init).resolve() if Path(args.init).exists() else args.init) != settings["init"]:
        raise UsageError(f"--init {args.init} cannot change when resuming (the run started from {settings['init']}); leave it out")
    print(f"resuming {checkpoint.path} at step {checkpoint.trainer_state['step']}" + (f", branching into {run_dir}" if branched else ""))
    if args.reset_optimizer:
        print("  --reset-optimizer: AdamW's running averages start again from zero")
    data_changed = False
    if args.data is not None:
        identity = data_identity(args.data)
        data_changed = identity["path"] != settings["data"] or check_same_data(settings.get("data_identity") or {}, identity) is not None
        if data_changed:
            print(f"data: continuing on {identity['path']} instead of {settings['data']} (as --data says)")
        settings.update(data=identity["path"], data_identity=identity)
    elif not Path(settings["data"]).is_file():
        raise UsageError(f"the run's data {settings['data']} is not there any more (moved or deleted); "
                         f"to continue on a file elsewhere, or on other data, give it with --data NEW")
    else:
        problem = check_same_data(settings.get("data_identity") or {}, data_identity(settings["data"]))
        if problem:
            raise UsageError(f"{problem}; to continue on the changed file say so with --data {settings['data']}")
    return Start(checkpoint.model, checkpoint.tokenizer, settings, run_dir, checkpoint, branched, data_changed)


# the options (argparse names) that are saved in the run's settings and cannot change on --resume
_FIXED = {"classify": ("text_column", "label_column", "balance", "train_frac", "val_frac", "trainable_blocks", "max_length"),
          "instruct": ("train_frac", "test_frac", "mask_prompt", "max_length")}


def _saved_option(settings: dict, option: str):
    if option == "max_length":
        return settings.get("max_length", settings.get("allowed_max_length"))
    if option == "trainable_blocks" and settings.get(option) is None:
        return "all"
    return settings.get(option)


def train_config(args, settings: dict, checkpoint):
    from tinygpt.train import TrainConfig

    if checkpoint is not None:
        saved = checkpoint.trainer_state["config"]
        changes = v.changes_on_resume(args, saved, RESUMABLE)
        for key, value in changes.items():
            print(f"  changed on resume: {key} {saved.get(key)} -> {value}")
        return TrainConfig(**{**saved, **changes})
    return TrainConfig(epochs=args.epochs or settings["default_epochs"], max_steps=args.max_steps, lr=args.lr, weight_decay=args.weight_decay,
                       eval_freq=args.eval_freq, eval_iter=args.eval_iter, checkpoint_every=args.checkpoint_every,
                       sample_tokens=getattr(args, "sample_tokens", None) or 50)


def run_trainer(trainer, start: Start) -> bool:
    """Train; False when Ctrl-C stopped it (a checkpoint was saved)."""
    if start.checkpoint is not None:
        state = start.checkpoint.trainer_state
        if start.data_changed:  # other data: its batches start at the beginning of the epoch
            state = {**state, "loader": {**state["loader"], "position": 0}}
        trainer.restore(state, start.checkpoint.optimizer_state, in_out_dir=not start.branched)
        if trainer.finished():
            raise UsageError(f"the run is complete at step {trainer.state.step} (max_steps {trainer.config.max_steps}, "
                             f"epochs {trainer.config.epochs}); train further with a larger --max-steps or --epochs")
    model = trainer.model
    print(f"trainable parameters: {model.num_parameters(trainable_only=True):,} of {model.num_parameters():,}"
          f"{' (LoRA adapters)' if 'lora' in model.cfg else ''}")
    trainer.fit()
    if trainer.interrupted:
        print(f"saved step {trainer.state.step} in {trainer.out_dir}; continue with --resume {trainer.out_dir}")
    return not trainer.interrupted


def check_batch(train_set, what: str, settings: dict) -> None:
    if len(train_set) < settings["batch_size"]:
        raise UsageError(f"the training split of {settings['data']} has {len(train_set)} {what}, fewer than "
                         f"--batch-size {settings['batch_size']}: no batch can be made (use more data, a smaller "
                         f"--batch-size, or a larger --train-frac)")


def make_optimizer(model, config):
    from tinygpt.optim import AdamW

    return AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
