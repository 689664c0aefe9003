"""The `tinygpt train` command: a new run, or `--resume` of a saved one.

A resumed run continues bit for bit unless told otherwise. Options that can change
mid-run (steps, learning rate and schedule, evaluation, checkpoints, samples) are applied
and said so; options that cannot (model shape, tokenizer, batch, stride, seed) are refused
with a list. The data must be the file the run started on, unchanged, or `--data NEW` says
explicitly that it continues on other data.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tinygpt import validation as v
from tinygpt.data.corpus import default_corpus
from tinygpt.validation import UsageError

# A model small enough to learn something visible in a few minutes on 2 CPU cores.
# Dropout is off: with 465,000 characters and a few minutes of training the model underfits.
DEFAULT_MODEL = {"emb_dim": 128, "n_layers": 4, "n_heads": 4, "context_length": 128, "drop_rate": 0.0, "qkv_bias": False}
# The schedule of a new run on the default text: 1000 steps (about 4 minutes on 2 cores), warmup
# then cosine decay from 2e-3 (the best of a few tries: val loss 2.09 after 400 steps, 2.33 at a
# constant 1e-3). With --data FILE: the book's schedule, a constant rate for 10 epochs.
DEFAULT_RUN = {"epochs": 100, "max_steps": 1000, "lr": 2e-3, "warmup_steps": 30, "cosine": True}
DATA_RUN = {"epochs": 10, "max_steps": None, "lr": 2e-3, "warmup_steps": 0, "cosine": False}
PRESET_LR = 4e-4  # with --model (a GPT-2 size): the book's rate for GPT-2; 2e-3 suits only the small default model
# Defaults of a new run. The options default to None so that a resumed run can tell which were given.
NEW_RUN = {"tokenizer": "char", "vocab_size": 1024, "batch_size": 16, "weight_decay": 0.1, "eval_freq": 100,
           "eval_iter": 10, "checkpoint_every": 200, "start_context": "The ", "sample_tokens": 100,
           "sample_temperature": 0.8, "seed": 123, "out": "runs/tinygpt"}
# TrainConfig fields that --resume may change (same names as the options)
RESUMABLE = ("epochs", "max_steps", "lr", "warmup_steps", "cosine", "grad_clip", "eval_freq", "eval_iter",
             "checkpoint_every", "start_context", "sample_tokens", "sample_temperature")
MODEL_OPTIONS = {"emb_dim": "emb_dim", "n_layers": "n_layers", "n_heads": "n_heads", "context_length": "context_length",
                 "dropout": "drop_rate", "qkv_bias": "qkv_bias", "tie_weights": "tie_weights"}


def read_text_file(path: str | Path, option: str = "--data") -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{option} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _build_tokenizer(args, text: str):
    from tinygpt.data import CharTokenizer, gpt2_tokenizer, train_bpe

    if args.tokenizer == "char":
        return CharTokenizer.from_text(text)
    if args.tokenizer == "gpt2":
        return gpt2_tokenizer(args.bpe_file)
    return train_bpe(text, args.vocab_size)


def _model_config(args, vocab_size: int) -> dict:
    from tinygpt.llama import LLAMA_PRESETS, cli_config
    from tinygpt.model import GPT_PRESETS

    if args.arch == "llama" or args.model in LLAMA_PRESETS:  # the sibling model, tinygpt/llama.py
        if args.arch == "gpt" or (args.model and args.model not in LLAMA_PRESETS):
            raise UsageError(f"--model {args.model} and --arch {args.arch or 'llama'} do not go together")
        changes = {key: getattr(args, option) for option, key in MODEL_OPTIONS.items() if getattr(args, option) is not None}
        try:
            return cli_config(args.model, {**changes, **({"n_kv_heads": args.n_kv_heads} if args.n_kv_heads else {})},
                              vocab_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.n_kv_heads is not None:
        raise UsageError("--n-kv-heads applies only to --arch llama")
    cfg = dict(GPT_PRESETS[args.model]) if args.model else dict(DEFAULT_MODEL)
    for option, key in MODEL_OPTIONS.items():
        if getattr(args, option) is not None:
            cfg[key] = getattr(args, option)
    cfg.update(vocab_size=vocab_size, qkv_bias=bool(cfg["qkv_bias"]), tie_weights=bool(cfg.get("tie_weights")))
    v.check_model_shape(cfg)
    return cfg


def _tokenizer_name(tokenizer) -> str:
    from tinygpt.data import tokenizer_to_dict

    return tokenizer_to_dict(tokenizer)["type"]


def run_train(args) -> int:
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.rundir import RunLock, resume_target

    if args.resume is None:
        if args.reset_optimizer:
            raise UsageError("--reset-optimizer applies only with --resume DIR")
        if args.vocab_size is not None and args.tokenizer != "bpe":
            raise UsageError(f"--vocab-size {args.vocab_size} applies only to --tokenizer bpe "
                             f"(the {args.tokenizer or 'char'} tokenizer's vocabulary is fixed by its text or file)")
        for key, value in NEW_RUN.items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
        _model_config(args, vocab_size=1)  # the shape's own checks, before any work
        with RunLock(args.out):
            return _new_run(args, Path(args.out))
    checkpoint = load_checkpoint(args.resume, device=args.device, bpe_file=args.bpe_file, optimizer=not args.reset_optimizer)
    saved = checkpoint.trainer_state or {}
    if checkpoint.task is not None or checkpoint.kind == "classifier":
        raise UsageError(f"{checkpoint.path} was written by `tinygpt finetune-{checkpoint.task or 'classify'}`; "
                         f"continue it with: tinygpt finetune-{checkpoint.task or 'classify'} --resume {args.resume}")
    if "config" not in saved or "loader" not in saved:
        raise UsageError(f"{checkpoint.path} holds weights but no training state to resume; "
                         f"sample from it with `tinygpt generate --checkpoint {args.resume}`")
    run_dir, branched = resume_target(checkpoint.path, saved["step"], args.out)
    with RunLock(run_dir):
        return _resumed_run(args, checkpoint, run_dir, branched)


def _new_run(args, run_dir: Path) -> int:
    from tinygpt.checkpoint import checkpoints
    from tinygpt.llama import LlamaModel
    from tinygpt.model import GPTModel
    from tinygpt.rundir import data_identity, text_identity
    from tinygpt.train import TrainConfig

    if checkpoints(run_dir) or (run_dir / "latest").exists():
        raise UsageError(f"{run_dir} already holds a training run; continue it with --resume {run_dir}, or pick another --out")
    text = read_text_file(args.data) if args.data else default_corpus()
    identity = data_identity(args.data) if args.data else text_identity(text, "pydoc_data.topics")
    data = {**identity, "batch_size": args.batch_size, "stride": args.stride, "seed": args.seed, "train_ratio": 0.9}
    schedule = {**(DATA_RUN if args.data else DEFAULT_RUN), **({"lr": PRESET_LR} if args.model else {})}
    chosen = {key: getattr(args, key) for key in schedule if getattr(args, key) is not None}
    config = TrainConfig(**{**schedule, **chosen}, weight_decay=args.weight_decay,
                         grad_clip=args.grad_clip, eval_freq=args.eval_freq, eval_iter=args.eval_iter,
                         start_context=args.start_context, sample_tokens=args.sample_tokens,
                         sample_temperature=args.sample_temperature, checkpoint_every=args.checkpoint_every)
    tokenizer = _build_tokenizer(args, text)
    import tinygpt as tg

    tg.manual_seed(args.seed)
    cfg = _model_config(args, tokenizer.n_vocab)
    model = (LlamaModel if cfg.get("arch") == "llama" else GPTModel)(cfg)
    return _fit(args, model, tokenizer, config, data, text, run_dir, checkpoint=None)


def _resumed_run(args, checkpoint, run_dir: Path, branched: bool) -> int:
    from tinygpt.train import TrainConfig

    saved = checkpoint.trainer_state
    model, data = checkpoint.model, dict(saved["meta"]["data"])
    v.check_fixed_on_resume(args, {
        **{option: model.cfg.get(key) for option, key in MODEL_OPTIONS.items()},
        "tokenizer": _tokenizer_name(checkpoint.tokenizer), "batch_size": data["batch_size"], "stride": data["stride"],
        "seed": data["seed"], "weight_decay": saved["config"]["weight_decay"],
        "vocab_size": checkpoint.tokenizer.n_vocab})
    if args.model:
        raise UsageError(f"--model {args.model} cannot change when resuming: the run's shape is saved with it; leave it out")
    text, data, data_changed = _resumed_data(args, data)
    changes = v.changes_on_resume(args, saved["config"], RESUMABLE)
    config = TrainConfig(**{**saved["config"], **changes})
    print(f"resuming {checkpoint.path} at step {saved['step']}" + (f", branching into {run_dir}" if branched else ""))
    for key, value in changes.items():
        print(f"  changed on resume: {key} {saved['config'].get(key)} -> {value}")
    if args.reset_optimizer:
        print("  --reset-optimizer: AdamW's running averages start again from zero")
    return _fit(args, model, checkpoint.tokenizer, config, data, text, run_dir,
                checkpoint=checkpoint, in_run_dir=not branched, data_changed=data_changed)


def _resumed_data(args, saved: dict) -> tuple[str, dict, bool]:
    """(text, data description, whether it is other data than the run's) for a resumed run."""
    from tinygpt.rundir import check_same_data, data_identity, text_identity

    if args.data is not None:
        identity = data_identity(args.data)
        changed = check_same_data(saved, identity) is not None or identity["path"] != saved.get("path")
        if changed:
            print(f"data: continuing on {identity['path']} instead of {saved.get('path') or saved.get('name')} (as --data says)")
        return read_text_file(args.data), {**saved, **identity}, changed
    if saved.get("path") is None:
        text = default_corpus()
        problem = check_same_data(saved, text_identity(text, "pydoc_data.topics"))
    else:
        path = Path(saved["path"])
        if not path.is_file():
            raise UsageError(f"the run's data {path} is not there any more (moved or deleted); "
                             f"to continue on a file elsewhere, or on other data, give it with --data NEW")
        text, problem = read_text_file(path), check_same_data(saved, data_identity(path))
    if problem:
        raise UsageError(f"{problem}; to continue on the changed text say so with --data {saved.get('path') or 'FILE'}")
    return text, saved, False


def _loaders(tokenizer, text: str, data: dict, context: int):
    from tinygpt.data import create_dataloader, train_val_split

    stride = data["stride"] or context
    train_text, val_text = train_val_split(text, data["train_ratio"])
    loaders = []
    for part, words, shuffle in ((train_text, "training part (first 90%)", True), (val_text, "validation part (last 10%)", False)):
        try:
            loaders.append(create_dataloader(part, tokenizer, data["batch_size"], context, stride, shuffle=shuffle,
                                             drop_last=shuffle, seed=data["seed"]))
        except ValueError as e:
            name = data.get("path") or data.get("name")
            raise UsageError(f"the {words} of {name} is too short: {e} (use a longer text or a smaller "
                             f"--context-length / --batch-size)") from None
    return loaders[0], loaders[1], train_text


def _fit(args, model, tokenizer, config, data, text, run_dir, checkpoint, in_run_dir=True, data_changed=False) -> int:
    from tinygpt.data import encode_text
    from tinygpt.model import size_mb
    from tinygpt.optim import AdamW
    from tinygpt.train import INTERRUPTED, Trainer, decay_groups, evaluate_model, generate_and_print_sample

    context = model.cfg["context_length"]
    train_loader, val_loader, train_text = _loaders(tokenizer, text, data, context)
    optimizer = AdamW(decay_groups(model, config.weight_decay), lr=config.lr, weight_decay=config.weight_decay)
    trainer = Trainer(model, optimizer, train_loader, val_loader, tokenizer, config, out_dir=run_dir,
                      progress=not args.no_progress, meta={"data": data})
    if checkpoint is not None:
        state = checkpoint.trainer_state
        if data_changed:  # other data: its batches start at the beginning of the epoch
            state = {**state, "loader": {**state["loader"], "position": 0}}
        trainer.restore(state, checkpoint.optimizer_state, in_out_dir=in_run_dir)
    n = model.num_parameters()
    tokens = len(encode_text(tokenizer, train_text))
    print(f"data: {data.get('path') or 'pydoc_data.topics (ships with Python)'}, {len(text):,} characters; "
          f"{type(tokenizer).__name__} with {tokenizer.n_vocab:,} tokens; {tokens:,} training tokens")
    print(f"model: {n:,} parameters ({size_mb(n):.1f} MB), {json.dumps({k: model.cfg[k] for k in ('emb_dim', 'n_layers', 'n_heads', 'context_length', 'drop_rate')})}")
    print(f"training: {trainer.total_steps} steps of {data['batch_size']} x {context} tokens, lr {config.lr}, on {args.device}; "
          f"checkpoints and loss history in {run_dir}/")
    sample = lambda label: generate_and_print_sample(model, tokenizer, config.start_context, config.sample_tokens,
                                                     show=lambda t: print(f"sample {label} training: {t}"),
                                                     temperature=config.sample_temperature)
    if trainer.state.step == 0:
        sample("before")
    if checkpoint is not None and trainer.finished():
        raise UsageError(f"the run is complete at step {trainer.state.step} (max_steps {config.max_steps}, epochs "
                         f"{config.epochs}); train further with a larger --max-steps or --epochs")
    history = trainer.fit()
    if trainer.interrupted:
        print(f"saved step {trainer.state.step} in {run_dir}; continue with: tinygpt train --resume {run_dir}")
        return INTERRUPTED
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, config.eval_iter)
    if history["val_loss"]:
        print(f"loss: train {history['train_loss'][0]:.3f} -> {train_loss:.3f}, val {history['val_loss'][0]:.3f} -> {val_loss:.3f} "
              f"(step {history['step'][0]} -> step {trainer.state.step})")
    sample("after")
    print(f"saved {run_dir / 'checkpoints' / f'step_{trainer.state.step:06d}'}; train further with: "
          f"tinygpt train --resume {run_dir} --max-steps N")
    return 0


def add_command(sub) -> None:
    from tinygpt.llama import LLAMA_PRESETS
    from tinygpt.model import GPT_PRESETS
    from tinygpt.train import TrainConfig

    p = sub.add_parser("train", help="pretrain a GPT (default: a small character-level model on text that ships with Python)")
    p.add_argument("--data", type=v.existing_file, help="a UTF-8 text file (default: pydoc_data.topics, offline); "
                   "with --resume: continue on this file instead of the run's own")
    p.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"], help=f"default {NEW_RUN['tokenizer']}")
    p.add_argument("--bpe-file", type=v.existing_file, help="local GPT-2 ranks file for --tokenizer gpt2 offline (or TINYGPT_BPE_FILE)")
    p.add_argument("--vocab-size", type=v.integer(257), help=f"vocabulary for --tokenizer bpe (default {NEW_RUN['vocab_size']})")
    p.add_argument("--arch", choices=["gpt", "llama"], help="gpt (default): the book's GPT-2; llama: RMSNorm, RoPE, "
                   "SwiGLU, grouped-query attention (tinygpt/llama.py)")
    p.add_argument("--model", choices=list(GPT_PRESETS) + list(LLAMA_PRESETS),
                   help="a GPT-2 size or a Llama-family preset (default: a small model, see --emb-dim ...)")
    p.add_argument("--emb-dim", type=v.positive_int)
    p.add_argument("--n-layers", type=v.positive_int)
    p.add_argument("--n-heads", type=v.positive_int)
    p.add_argument("--n-kv-heads", type=v.positive_int, help="--arch llama: key/value heads, dividing --n-heads")
    p.add_argument("--context-length", type=v.positive_int)
    p.add_argument("--dropout", type=v.dropout, help="dropout rate in [0, 1)")
    p.add_argument("--qkv-bias", action="store_true", default=None)
    p.add_argument("--tie-weights", action="store_true", default=None, help="share tok_emb and out_head weights")
    p.add_argument("--batch-size", type=v.positive_int, help=f"default {NEW_RUN['batch_size']}")
    p.add_argument("--stride", type=v.positive_int, help="window stride in tokens (default: the context length)")
    p.add_argument("--lr", type=v.positive, help=f"peak learning rate (default {DEFAULT_RUN['lr']:g}; {PRESET_LR:g} with --model); "
                   "with --resume, e.g. a lower one after a divergence")
    p.add_argument("--weight-decay", type=v.non_negative, help=f"default {NEW_RUN['weight_decay']}")
    p.add_argument("--warmup-steps", type=v.count, help=f"linear warmup steps (default {DATA_RUN['warmup_steps']}; "
                   f"{DEFAULT_RUN['warmup_steps']} for the default run)")
    p.add_argument("--cosine", action=argparse.BooleanOptionalAction, help=f"cosine decay to {TrainConfig.min_lr:g} after warmup "
                   f"(default: on for the default run)")
    p.add_argument("--grad-clip", type=v.positive, help="clip the global gradient norm to this")
    p.add_argument("--epochs", type=v.positive_int, help=f"default {DATA_RUN['epochs']} (--data) or until --max-steps (default run)")
    p.add_argument("--max-steps", type=v.positive_int, help=f"default: none with --data, {DEFAULT_RUN['max_steps']} for the default run")
    p.add_argument("--eval-freq", type=v.positive_int, help=f"evaluate every this many steps (default {NEW_RUN['eval_freq']})")
    p.add_argument("--eval-iter", type=v.positive_int, help=f"batches per evaluation (default {NEW_RUN['eval_iter']})")
    p.add_argument("--checkpoint-every", type=v.count, help=f"steps between checkpoints, 0: only at the end "
                   f"(default {NEW_RUN['checkpoint_every']})")
    p.add_argument("--start-context", type=v.text, help=f"the prompt of the samples (default {NEW_RUN['start_context']!r})")
    p.add_argument("--sample-tokens", type=v.count, help=f"length of the samples (default {NEW_RUN['sample_tokens']})")
    p.add_argument("--sample-temperature", type=v.non_negative, help=f"0 for greedy samples (default {NEW_RUN['sample_temperature']})")
    p.add_argument("--seed", type=v.seed, help=f"default {NEW_RUN['seed']}")
    p.add_argument("--device", choices=["cpu", "cuda", "strict"], help="default $TINYGPT_DEVICE or cpu")
    p.add_argument("--out", help=f"run directory for checkpoints and loss history (default {NEW_RUN['out']}); "
                   "with --resume: branch into this new directory")
    p.add_argument("--resume", metavar="DIR", type=v.existing_path, help="continue the run (or checkpoint) saved in DIR exactly where it stopped")
    p.add_argument("--reset-optimizer", action="store_true", help="with --resume: restart AdamW's running averages (when its state is lost)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="data parallel over the ranks MPI started (automatic under mpiexec/mpirun)")
    p.add_argument("--detect-anomaly", action="store_true",
                   help="stop at the first op making an inf/NaN (forward or gradient), naming its module and line; slower")
    p.set_defaults(run=_train_command)


def _train_command(args) -> int:
    """run_train, inside tg.detect_anomaly() when --detect-anomaly is given."""
    if not args.detect_anomaly:
        return run_train(args)
    from tinygpt.trace import detect_anomaly

    with detect_anomaly():
        return run_train(args)
