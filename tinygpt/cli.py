"""The `tinygpt` command."""
from __future__ import annotations

import argparse
import sys


def _gradcheck(args) -> int:
    import tinygpt as tg
    from tinygpt.opsuite import cases

    tg.set_default_device(args.device)
    suite = cases(args.device, seed=args.seed)
    unknown = [op for op in args.ops if op not in suite]
    if unknown:
        print(f"unknown op(s): {', '.join(unknown)}; choose from: {', '.join(suite)}", file=sys.stderr)
        return 2
    failures = 0
    print(f"gradcheck on {args.device}, eps={args.eps}, atol={args.atol}, rtol={args.rtol}")
    print(f"{'op':<18} {'shape':<26} {'max abs err':>12} {'max rel err':>12}  result")
    for name in args.ops or suite:
        shape, fn, inputs = suite[name]
        report = tg.gradcheck_report(fn, inputs, eps=args.eps, atol=args.atol, rtol=args.rtol)
        failures += not report.passed
        print(f"{name:<18} {shape:<26} {report.max_abs_error:>12.2e} {report.max_rel_error:>12.2e}  {'pass' if report.passed else 'FAIL'}")
        if not report.passed:
            print(f"    {report.describe()}")
    print(f"{len(args.ops or suite) - failures} passed, {failures} failed")
    return 1 if failures else 0


def _info(args) -> int:
    from tinygpt.model import GPT_PRESETS, count_parameters, parameter_table, size_mb

    cfg = GPT_PRESETS[args.model]
    rows = dict(parameter_table(cfg))
    n = cfg["n_layers"]
    block = {part: rows[f"trf_blocks.0.{part}"] for part in ("att", "ff", "norm1", "norm2")}
    per_block = sum(block.values())
    print(f"{args.model}: vocab {cfg['vocab_size']}, context {cfg['context_length']}, emb_dim {cfg['emb_dim']}, "
          f"{n} layers, {cfg['n_heads']} heads, qkv_bias {cfg['qkv_bias']}")
    print(f"{'module':<34}{'parameters':>14}")
    print(f"{'tok_emb':<34}{rows['tok_emb']:>14,}")
    print(f"{'pos_emb':<34}{rows['pos_emb']:>14,}")
    print(f"{f'trf_blocks ({n} x {per_block:,})':<34}{n * per_block:>14,}")
    for part, count in block.items():
        print(f"{'  each block .' + part:<34}{count:>14,}")
    print(f"{'final_norm':<34}{rows['final_norm']:>14,}")
    print(f"{'out_head':<34}{rows['out_head']:>14,}")
    total, tied = count_parameters(cfg), count_parameters({**cfg, "tie_weights": True})
    print(f"{'total':<34}{total:>14,}   ({size_mb(total):.2f} MB in float32)")
    print(f"{'total, out_head tied to tok_emb':<34}{tied:>14,}   ({size_mb(tied):.2f} MB in float32)")
    return 0


# A model small enough to learn something visible in a few minutes on 2 CPU cores.
# Dropout is off: with 465,000 characters and a few minutes of training the model underfits.
DEFAULT_MODEL = {"emb_dim": 128, "n_layers": 4, "n_heads": 4, "context_length": 128, "drop_rate": 0.0, "qkv_bias": False}
# The default run's schedule: 1000 steps (about 4 minutes on 2 cores), warmup then cosine decay
# from 2e-3 (the best of a few tries: val loss 2.09 after 400 steps, 2.33 at a constant 1e-3).
DEFAULT_RUN = {"max_steps": 1000, "lr": 2e-3, "warmup_steps": 30, "cosine": True}


def default_corpus() -> str:
    """The reference text that ships with CPython (pydoc_data.topics): ~465,000 characters
    of English about Python, present on any machine with Python and no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise RuntimeError("this Python has no pydoc_data module (the default training text); pass --data FILE") from None
    return "\n\n".join(topics[key] for key in sorted(topics))


def _build_tokenizer(args, text: str):
    from tinygpt.data import CharTokenizer, gpt2_tokenizer, train_bpe

    if args.tokenizer == "char":
        return CharTokenizer.from_text(text)
    if args.tokenizer == "gpt2":
        return gpt2_tokenizer(args.bpe_file)
    return train_bpe(text, args.vocab_size)


def _model_config(args, vocab_size: int) -> dict:
    from tinygpt.model import GPT_PRESETS

    cfg = dict(GPT_PRESETS[args.model]) if args.model else dict(DEFAULT_MODEL)
    for key, value in (("emb_dim", args.emb_dim), ("n_layers", args.n_layers), ("n_heads", args.n_heads),
                       ("context_length", args.context_length), ("drop_rate", args.dropout)):
        if value is not None:
            cfg[key] = value
    cfg.update(vocab_size=vocab_size, qkv_bias=cfg["qkv_bias"] or args.qkv_bias, tie_weights=args.tie_weights)
    return cfg


def _train(args) -> int:
    import json
    from pathlib import Path

    import tinygpt as tg
    from tinygpt.checkpoint import load_checkpoint, resolve_checkpoint
    from tinygpt.data import create_dataloader, encode_text, train_val_split
    from tinygpt.model import GPTModel, size_mb
    from tinygpt.optim import AdamW
    from tinygpt.train import TrainConfig, Trainer, decay_groups, evaluate_model, generate_and_print_sample

    tg.set_default_device(args.device)
    tg.manual_seed(args.seed)
    if args.resume:
        checkpoint = load_checkpoint(args.resume, device=args.device, bpe_file=args.bpe_file)
        run_dir = Path(args.resume) if (Path(args.resume) / "latest").exists() else resolve_checkpoint(args.resume).parent.parent
        model, tokenizer, saved = checkpoint.model, checkpoint.tokenizer, checkpoint.trainer_state
        data = saved["meta"]["data"]
        config = TrainConfig(**{**saved["config"], **({"epochs": args.epochs} if args.epochs is not None else {}),
                                "max_steps": args.max_steps if args.max_steps is not None else saved["config"]["max_steps"]})
        print(f"resuming {checkpoint.path} at step {saved['step']}")
    else:
        run_dir = Path(args.out)
        if (run_dir / "latest").exists():
            print(f"{run_dir} already holds a training run; continue it with --resume {run_dir}, or pick another --out", file=sys.stderr)
            return 2
        data = {"path": args.data, "batch_size": args.batch_size, "stride": args.stride, "seed": args.seed, "train_ratio": 0.9}
        defaults = dict(DEFAULT_RUN) if args.data is None else {"max_steps": None, "warmup_steps": 0, "cosine": False,
                                                                 "lr": 4e-4 if args.model else 2e-3}
        chosen = {key: getattr(args, key) for key in defaults if getattr(args, key) is not None}
        config = TrainConfig(epochs=args.epochs if args.epochs is not None else (10 if args.data else 100),
                             **{**defaults, **chosen}, weight_decay=args.weight_decay,
                             grad_clip=args.grad_clip, eval_freq=args.eval_freq, eval_iter=args.eval_iter,
                             start_context=args.start_context, sample_tokens=args.sample_tokens,
                             sample_temperature=args.sample_temperature,
                             checkpoint_every=args.checkpoint_every)
    text = Path(data["path"]).read_text(encoding="utf-8") if data["path"] else default_corpus()
    if not args.resume:
        tokenizer = _build_tokenizer(args, text)
        model = GPTModel(_model_config(args, tokenizer.n_vocab))
    context = model.cfg["context_length"]
    stride = data["stride"] or context
    train_text, val_text = train_val_split(text, data["train_ratio"])
    train_loader = create_dataloader(train_text, tokenizer, data["batch_size"], context, stride, shuffle=True, drop_last=True, seed=data["seed"])
    val_loader = create_dataloader(val_text, tokenizer, data["batch_size"], context, stride, shuffle=False, drop_last=False, seed=data["seed"])
    optimizer = AdamW(decay_groups(model, config.weight_decay), lr=config.lr, weight_decay=config.weight_decay)
    trainer = Trainer(model, optimizer, train_loader, val_loader, tokenizer, config, out_dir=run_dir,
                      progress=not args.no_progress, meta={"data": data})
    if args.resume:
        trainer.restore(saved, checkpoint.optimizer_state)

    n = model.num_parameters()
    tokens = len(encode_text(tokenizer, train_text))
    print(f"data: {data['path'] or 'pydoc_data.topics (ships with Python)'}, {len(text):,} characters; "
          f"{type(tokenizer).__name__} with {tokenizer.n_vocab:,} tokens; {tokens:,} training tokens")
    print(f"model: {n:,} parameters ({size_mb(n):.1f} MB), {json.dumps({k: model.cfg[k] for k in ('emb_dim', 'n_layers', 'n_heads', 'context_length', 'drop_rate')})}")
    print(f"training: {trainer.total_steps} steps of {data['batch_size']} x {context} tokens, lr {config.lr}, on {args.device}; "
          f"checkpoints and loss history in {run_dir}/")
    if trainer.state.step == 0:
        generate_and_print_sample(model, tokenizer, config.start_context, config.sample_tokens,
                                  show=lambda t: print(f"sample before training: {t}"), temperature=config.sample_temperature)
    history = trainer.fit()
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, config.eval_iter)
    if history["val_loss"]:
        print(f"loss: train {history['train_loss'][0]:.3f} -> {train_loss:.3f}, val {history['val_loss'][0]:.3f} -> {val_loss:.3f} "
              f"(step {history['step'][0]} -> step {trainer.state.step})")
    generate_and_print_sample(model, tokenizer, config.start_context, config.sample_tokens,
                              show=lambda t: print(f"sample after training: {t}"), temperature=config.sample_temperature)
    print(f"saved {resolve_checkpoint(run_dir)}; train further with: tinygpt train --resume {run_dir} --max-steps N")
    return 0


def _generate(args) -> int:
    import time

    import tinygpt as tg
    from tinygpt.generate import StreamPrinter, generate, text_to_token_ids

    tg.set_default_device(args.device)
    if args.checkpoint:
        from tinygpt.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(args.checkpoint, device=args.device, bpe_file=args.bpe_file)
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
    else:
        from tinygpt.data import gpt2_tokenizer
        from tinygpt.pretrained import load_gpt2

        model, tokenizer = load_gpt2(args.model, device=args.device), gpt2_tokenizer(args.bpe_file)
    tg.manual_seed(args.seed)
    prompt = text_to_token_ids(args.prompt, tokenizer)
    stream = StreamPrinter(tokenizer)
    sys.stdout.write(args.prompt)
    started = time.perf_counter()
    generate(model, prompt, args.max_new_tokens, model.cfg["context_length"], temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, eos_id=getattr(tokenizer, "eot_token", None), use_cache=not args.no_cache, on_token=stream)
    seconds = time.perf_counter() - started
    stream.finish()
    sys.stdout.write("\n")
    n = len(stream.ids)
    print(f"[{n} tokens in {seconds:.1f} s, {n / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygpt", description="A GPT you can read: NumPy/CuPy engine with hand-written gradients.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="check every op's backward against finite differences")
    p.add_argument("ops", nargs="*", help="ops to check (default: all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "strict"])
    p.add_argument("--dtype", default="float64", choices=["float64"], help="finite differences need float64 (float32 rounding swamps the difference quotient)")
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_gradcheck)

    from tinygpt.model import GPT_PRESETS

    p = sub.add_parser("info", help="parameter counts and memory of a GPT preset, module by module")
    p.add_argument("--model", default="gpt2-small", choices=list(GPT_PRESETS))
    p.set_defaults(run=_info)

    p = sub.add_parser("train", help="pretrain a GPT (default: a small character-level model on text that ships with Python)")
    p.add_argument("--data", help="a UTF-8 text file (default: pydoc_data.topics, offline)")
    p.add_argument("--tokenizer", default="char", choices=["char", "gpt2", "bpe"])
    p.add_argument("--bpe-file", help="local GPT-2 ranks file for --tokenizer gpt2 offline (or TINYGPT_BPE_FILE)")
    p.add_argument("--vocab-size", type=int, default=1024, help="vocabulary for --tokenizer bpe")
    p.add_argument("--model", choices=list(GPT_PRESETS), help="a GPT-2 size (default: a small model, see --emb-dim ...)")
    p.add_argument("--emb-dim", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--context-length", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--qkv-bias", action="store_true")
    p.add_argument("--tie-weights", action="store_true", help="share tok_emb and out_head weights")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--stride", type=int, help="window stride in tokens (default: the context length)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3; 4e-4 with --model)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0; 30 for the default run)")
    p.add_argument("--cosine", action=argparse.BooleanOptionalAction, help="cosine decay to 1e-6 after warmup (default: on for the default run)")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this")
    p.add_argument("--epochs", type=int, help="default 10 (--data) or until --max-steps (default run)")
    p.add_argument("--max-steps", type=int, help="default: none with --data, 1000 for the default run")
    p.add_argument("--eval-freq", type=int, default=100)
    p.add_argument("--eval-iter", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--start-context", default="The ")
    p.add_argument("--sample-tokens", type=int, default=100)
    p.add_argument("--sample-temperature", type=float, default=0.8, help="0 for greedy samples")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/tinygpt", help="run directory for checkpoints and loss history")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)

    p = sub.add_parser("generate", help="continue a prompt with GPT-2 or a model trained with `tinygpt train`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded once) or a Hugging Face GPT-2 folder")
    source.add_argument("--checkpoint", metavar="DIR", help="a run or checkpoint folder written by `tinygpt train`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bpe-file", help="local GPT-2 ranks file for offline use (or TINYGPT_BPE_FILE)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.set_defaults(run=_generate)

    from tinygpt.finetune.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"tinygpt: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
