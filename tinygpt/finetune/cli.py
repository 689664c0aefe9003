"""The finetuning commands: `tinygpt finetune-classify`, `classify`, `finetune-instruct`,
`chat` and `download`.

Both finetuning commands run the pretraining Trainer (checkpoints, Ctrl-C, exact --resume)
on their own datasets. Everything a run needs to rebuild its data and its frozen layers
(file, columns, split, labels, LoRA) is kept in the checkpoint's `meta`, so `--resume DIR`
needs no other option, and `classify` and `chat` need only the checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

BOOK = {"lr": 5e-5, "weight_decay": 0.1, "batch_size": 8}  # chapters 6 and 7


def _start(args, task: str):
    """(model, tokenizer, settings, run_dir, checkpoint or None) of a new or resumed run."""
    import tinygpt as tg
    from tinygpt.checkpoint import load_checkpoint, resolve_checkpoint
    from tinygpt.pretrained import load_model_and_tokenizer

    tg.set_default_device(args.device)
    tg.manual_seed(args.seed)
    if args.resume:
        checkpoint = load_checkpoint(args.resume, device=args.device, bpe_file=args.bpe_file)
        settings = (checkpoint.trainer_state or {}).get("meta", {})
        if settings.get("task") != task:
            raise ValueError(f"{args.resume} is not a {task} run (its task is {settings.get('task')!r})")
        run_dir = resolve_checkpoint(args.resume).parent.parent
        print(f"resuming {checkpoint.path} at step {checkpoint.trainer_state['step']}")
        return checkpoint.model, checkpoint.tokenizer, settings, run_dir, checkpoint
    run_dir = Path(args.out)
    if (run_dir / "latest").exists():
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick another --out")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    model, tokenizer = load_model_and_tokenizer(args.init, device=args.device, bpe_file=args.bpe_file)
    init = Path(args.init).resolve() if Path(args.init).exists() else args.init  # absolute: resumable from anywhere
    settings = {"task": task, "init": str(init), "data": str(Path(args.data).resolve()), "seed": args.seed, "batch_size": args.batch_size,
                "lora": None if args.lora_rank is None else {"rank": args.lora_rank, "alpha": args.lora_alpha}}
    return model, tokenizer, settings, run_dir, None


def _train_config(args, settings: dict, checkpoint):
    from tinygpt.train import TrainConfig

    if checkpoint is not None:
        saved = checkpoint.trainer_state["config"]
        changed = {key: getattr(args, key) for key in ("epochs", "max_steps") if getattr(args, key) is not None}
        return TrainConfig(**{**saved, **changed})
    return TrainConfig(epochs=args.epochs or settings["default_epochs"], max_steps=args.max_steps, lr=args.lr, weight_decay=args.weight_decay,
                       eval_freq=args.eval_freq, eval_iter=args.eval_iter, checkpoint_every=args.checkpoint_every,
                       sample_tokens=getattr(args, "sample_tokens", 50))


def _run(trainer, checkpoint) -> None:
    if checkpoint is not None:
        trainer.restore(checkpoint.trainer_state, checkpoint.optimizer_state)
    model = trainer.model
    print(f"trainable parameters: {model.num_parameters(trainable_only=True):,} of {model.num_parameters():,}"
          f"{' (LoRA adapters)' if 'lora' in model.cfg else ''}")
    trainer.fit()


def _optimizer(model, config):
    from tinygpt.optim import AdamW

    return AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)


# ------------------------------------------------------------------ classification (chapter 6)

def _finetune_classify(args) -> int:
    from tinygpt.data import DataLoader, encode_text
    from tinygpt.finetune.classify import (ClassificationDataset, ClassifierTrainer, balance_classes, calc_accuracy,
                                           make_classifier, random_split, read_labelled_file, train_only_the_top)
    from tinygpt.finetune.lora import replace_linear_with_lora

    model, tokenizer, settings, run_dir, checkpoint = _start(args, "classify")
    if checkpoint is None:
        settings.update(text_column=args.text_column, label_column=args.label_column, balance=args.balance,
                        train_frac=args.train_frac, val_frac=args.val_frac, trainable_blocks=args.trainable_blocks,
                        default_epochs=5)
    texts, labels = read_labelled_file(settings["data"], settings["text_column"], settings["label_column"])
    if settings["balance"]:
        texts, labels = balance_classes(texts, labels, settings["seed"])
    train, val, test = random_split(len(texts), settings["train_frac"], settings["val_frac"], settings["seed"])
    if checkpoint is None:
        settings["labels"] = sorted(set(labels))
        if len(settings["labels"]) < 2:
            raise ValueError(f"{settings['data']}: column {settings['label_column']!r} has only one label, "
                             f"{settings['labels'][0]!r}; a classifier needs at least 2")
        # as the book: pad to the longest training text, and cut val/test texts to that length
        context = model.cfg["context_length"]
        longest = max(len(encode_text(tokenizer, texts[i])) for i in train)
        settings["max_length"] = min(args.max_length or longest, context)
        make_classifier(model, len(settings["labels"]), settings["trainable_blocks"])
        if settings["lora"]:
            replace_linear_with_lora(model, **settings["lora"])
    elif not settings["lora"]:
        train_only_the_top(model, settings["trainable_blocks"])  # LoRA checkpoints reload frozen already
    pad = getattr(tokenizer, "eot_token", 0)  # any id works: positions after the last real token are never read
    part = lambda idx: ClassificationDataset([texts[i] for i in idx], [labels[i] for i in idx], tokenizer,
                                             settings["labels"], settings["max_length"], pad)
    train_set, val_set, test_set = part(train), part(val), part(test)
    print(f"data: {settings['data']}, {len(texts):,} texts, labels {settings['labels']}; "
          f"{len(train_set)} train / {len(val_set)} val / {len(test_set)} test, padded to {settings['max_length']} tokens")
    config = _train_config(args, settings, checkpoint)
    train_loader = DataLoader(train_set, settings["batch_size"], shuffle=True, drop_last=True, seed=settings["seed"])
    val_loader = DataLoader(val_set, settings["batch_size"])
    trainer = ClassifierTrainer(model, _optimizer(model, config), train_loader, val_loader, tokenizer, config,
                                out_dir=run_dir, progress=not args.no_progress, meta=settings)
    _run(trainer, checkpoint)
    accuracy = {name: calc_accuracy(data, model, settings["batch_size"])
                for name, data in (("train", train_set), ("val", val_set), ("test", test_set))}
    print("accuracy: " + ", ".join(f"{name} {acc:.1%}" for name, acc in accuracy.items()))
    print(f"saved {run_dir}; try: tinygpt classify --checkpoint {run_dir} \"some text\"")
    return 0


def _classify(args) -> int:
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.finetune.classify import classify
    from tinygpt.finetune.lora import merge_lora

    checkpoint = load_checkpoint(args.checkpoint, device=args.device, bpe_file=args.bpe_file)
    settings = (checkpoint.trainer_state or {}).get("meta", {})
    if settings.get("task") != "classify":
        raise ValueError(f"{checkpoint.path} is not a classifier from `tinygpt finetune-classify` (no labels saved with it)")
    model = merge_lora(checkpoint.model)
    for text in args.texts:
        label, probs = classify(text, model, checkpoint.tokenizer, settings["labels"], settings["max_length"])
        print(f"{label}\t" + "  ".join(f"{name} {p:.3f}" for name, p in probs.items()) + f"\t{text}")
    return 0


# ------------------------------------------------------------------ instruction following (chapter 7)

def _finetune_instruct(args) -> int:
    from tinygpt.data import DataLoader
    from tinygpt.finetune.instruct import (InstructionDataset, InstructionTrainer, load_instruction_data,
                                           split_instruction_data, write_responses)
    from tinygpt.finetune.lora import replace_linear_with_lora

    model, tokenizer, settings, run_dir, checkpoint = _start(args, "instruct")
    eot = getattr(tokenizer, "eot_token", None)
    if eot is None:
        raise ValueError(f"instruction finetuning needs a tokenizer with an end-of-text token; {args.resume or args.init} "
                         f"uses a {type(tokenizer).__name__}, which has none (train with --tokenizer gpt2 or bpe)")
    if checkpoint is None:
        settings.update(train_frac=args.train_frac, test_frac=args.test_frac, mask_prompt=args.mask_prompt,
                        allowed_max_length=min(args.max_length or 1024, model.cfg["context_length"]), default_epochs=2)
        if settings["lora"]:
            replace_linear_with_lora(model, **settings["lora"])
    train, val, test = split_instruction_data(load_instruction_data(settings["data"]), settings["train_frac"], settings["test_frac"])
    part = lambda records: InstructionDataset(records, tokenizer, eot, settings["allowed_max_length"], settings["mask_prompt"])
    print(f"data: {settings['data']}: {len(train)} train / {len(val)} val / {len(test)} test records")
    config = _train_config(args, settings, checkpoint)
    train_loader = DataLoader(part(train), settings["batch_size"], shuffle=True, drop_last=True, seed=settings["seed"])
    val_loader = DataLoader(part(val), settings["batch_size"])
    trainer = InstructionTrainer(model, _optimizer(model, config), train_loader, val_loader, tokenizer, config,
                                 out_dir=run_dir, progress=not args.no_progress, meta=settings, sample_entry=val[0])
    _run(trainer, checkpoint)
    records = test[:args.responses] if args.responses is not None else test
    if records:
        path = run_dir / "test-responses.json"
        print(f"answering {len(records)} held-out instructions into {path}")
        write_responses(path, records, model, tokenizer, args.max_new_tokens, show=print)
    print(f"saved {run_dir}; try: tinygpt chat --checkpoint {run_dir} \"Name a primary color.\"")
    return 0


def _chat(args) -> int:
    import tinygpt as tg
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.finetune.instruct import generate_response
    from tinygpt.finetune.lora import merge_lora
    from tinygpt.generate import StreamPrinter

    checkpoint = load_checkpoint(args.checkpoint, device=args.device, bpe_file=args.bpe_file)
    model, tokenizer = merge_lora(checkpoint.model), checkpoint.tokenizer
    tg.manual_seed(args.seed)
    interactive = args.instruction is None
    if interactive and sys.stdin.isatty():
        print("Type an instruction and press Enter (Ctrl-D to quit).")
    instructions = [args.instruction] if not interactive else (line.strip() for line in sys.stdin)
    for instruction in instructions:
        if not instruction:
            continue
        stream = StreamPrinter(tokenizer, stop_id=getattr(tokenizer, "eot_token", None))
        generate_response(model, tokenizer, {"instruction": instruction, "input": args.input or ""}, args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, on_token=stream)
        stream.finish()
        sys.stdout.write("\n")
    return 0


def _download(args) -> int:
    if args.name == "sms-spam":
        from tinygpt.finetune.sms_spam import download_sms_spam

        path = download_sms_spam(args.dir or "data")
        print(f"{path}; finetune with: tinygpt finetune-classify --data {path} --text-column Text --label-column Label --balance")
    else:
        from tinygpt.pretrained import download_gpt2

        print(download_gpt2(args.name, args.dir))
    return 0


# ------------------------------------------------------------------ options

def _common(p, init_default: str, out_default: str, epochs_default: int, eval_freq: int) -> None:
    p.add_argument("--data", help="the data file (required unless --resume)")
    p.add_argument("--init", default=init_default,
                   help=f"gpt2, gpt2-medium, ... (downloaded once), a Hugging Face GPT-2 folder, or a `tinygpt train` run (default {init_default})")
    p.add_argument("--epochs", type=int, help=f"default {epochs_default}, as the book")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=BOOK["batch_size"])
    p.add_argument("--lr", type=float, default=BOOK["lr"])
    p.add_argument("--weight-decay", type=float, default=BOOK["weight_decay"])
    p.add_argument("--max-length", type=int, help="truncate examples to this many tokens")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the weights (appendix E)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--eval-freq", type=int, default=eval_freq)
    p.add_argument("--eval-iter", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--out", default=out_default, help="run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bpe-file", help="local GPT-2 ranks file for offline use (or TINYGPT_BPE_FILE)")
    p.add_argument("--no-progress", action="store_true")


def _require_data(run):
    def checked(args) -> int:
        if not args.resume and not args.data:
            raise ValueError("--data FILE is required (unless --resume DIR)")
        if args.resume and args.data:
            raise ValueError("--resume continues with the run's own data; leave out --data")
        return run(args)
    return checked


def add_commands(sub) -> None:
    p = sub.add_parser("finetune-classify", help="finetune a GPT into a text classifier (book chapter 6)")
    _common(p, "gpt2", "runs/classifier", 5, 50)
    p.add_argument("--text-column", default="Text")
    p.add_argument("--label-column", default="Label")
    p.add_argument("--balance", action="store_true", help="undersample every label to the rarest one's count")
    p.add_argument("--train-frac", type=float, default=0.7)
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--trainable-blocks", type=int, default=1, help="train this many top transformer blocks")
    p.add_argument("--train-all", dest="trainable_blocks", action="store_const", const=None,
                   help="train the whole model, embeddings included")
    p.set_defaults(run=_require_data(_finetune_classify))

    p = sub.add_parser("classify", help="label texts with a model from `tinygpt finetune-classify`")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bpe-file")
    p.set_defaults(run=_classify)

    p = sub.add_parser("finetune-instruct", help="finetune a GPT to follow instructions (book chapter 7)")
    _common(p, "gpt2-medium", "runs/instruct", 2, 5)
    p.add_argument("--train-frac", type=float, default=0.85)
    p.add_argument("--test-frac", type=float, default=0.1)
    p.add_argument("--mask-prompt", action="store_true", help="score only the response tokens")
    p.add_argument("--sample-tokens", type=int, default=50, help="length of the responses shown while training")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest response to the held-out instructions")
    p.add_argument("--responses", type=int, help="answer only the first N held-out instructions (default: all)")
    p.set_defaults(run=_require_data(_finetune_instruct))

    p = sub.add_parser("chat", help="answer instructions with a model from `tinygpt finetune-instruct`")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("instruction", nargs="?", help="one instruction (default: read one per line from stdin)")
    p.add_argument("--input", help="the optional input field of the prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bpe-file")
    p.set_defaults(run=_chat)

    from tinygpt.pretrained import GPT2_NAMES

    p = sub.add_parser("download", help="fetch GPT-2 weights or the SMS Spam Collection ahead of time")
    p.add_argument("name", choices=[*GPT2_NAMES, "sms-spam"])
    p.add_argument("--dir", help="where to put it (default: the weights cache, or ./data for sms-spam)")
    p.set_defaults(run=_download)

