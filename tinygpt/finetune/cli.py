"""The finetuning commands: `tinygpt finetune-classify`, `classify`, `finetune-instruct`,
`chat` and `download`.

Both finetuning commands run the pretraining Trainer (checkpoints, Ctrl-C, exact --resume)
on their own datasets. Everything a run needs to rebuild its data and its frozen layers
(file, columns, split, labels, LoRA) is kept in the checkpoint's `meta`, so `--resume DIR`
needs no other option, and `classify` and `chat` need only the checkpoint.
"""
from __future__ import annotations

import os
import sys

from tinygpt import distributed
from tinygpt import validation as v
from tinygpt.finetune.runs import (BOOK, NEW_RUN, Start, check_batch, make_optimizer, run_trainer, start_run,
                                   train_config)
from tinygpt.validation import UsageError

# ------------------------------------------------------------------ classification (chapter 6)

def _finetune_classify(args, start: Start) -> int:
    from tinygpt.data import DataLoader, encode_text
    from tinygpt.finetune.classify import (ClassificationDataset, ClassifierTrainer, balance_classes, calc_accuracy,
                                           make_classifier, random_split, read_labelled_file, train_only_the_top)
    from tinygpt.finetune.lora import replace_linear_with_lora

    model, tokenizer, settings, run_dir, checkpoint = start.model, start.tokenizer, start.settings, start.run_dir, start.checkpoint
    if checkpoint is None:
        settings.update(text_column=args.text_column or "Text", label_column=args.label_column or "Label",
                        balance=bool(args.balance), train_frac=args.train_frac or 0.7, val_frac=args.val_frac or 0.1,
                        trainable_blocks=None if args.trainable_blocks == "all" else (args.trainable_blocks or 1),
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
    else:
        unknown = sorted(set(labels) - set(settings["labels"]))
        if unknown:
            raise UsageError(f"{settings['data']} has labels the classifier was not built for: {unknown} "
                             f"(its labels are {settings['labels']})")
        if not settings["lora"]:
            train_only_the_top(model, settings["trainable_blocks"])  # LoRA checkpoints reload frozen already
    pad = getattr(tokenizer, "eot_token", 0)  # any id works: positions after the last real token are never read
    part = lambda idx: ClassificationDataset([texts[i] for i in idx], [labels[i] for i in idx], tokenizer,
                                             settings["labels"], settings["max_length"], pad)
    train_set, val_set, test_set = part(train), part(val), part(test)
    print(f"data: {settings['data']}, {len(texts):,} texts, labels {settings['labels']}; "
          f"{len(train_set)} train / {len(val_set)} val / {len(test_set)} test, padded to {settings['max_length']} tokens")
    check_batch(train_set, "texts", settings)
    config = train_config(args, settings, checkpoint)
    train_loader = DataLoader(train_set, settings["batch_size"], shuffle=True, drop_last=True, seed=settings["seed"])
    val_loader = DataLoader(val_set, settings["batch_size"])
    trainer = ClassifierTrainer(model, make_optimizer(model, config), train_loader, val_loader, tokenizer, config,
                                out_dir=run_dir, progress=not args.no_progress, meta=settings)
    if not run_trainer(trainer, start):
        return 130
    accuracy = {name: calc_accuracy(data, model, settings["batch_size"])
                for name, data in (("train", train_set), ("val", val_set), ("test", test_set))}
    print("accuracy: " + ", ".join(f"{name} {acc:.1%}" for name, acc in accuracy.items()))
    print(f"saved {run_dir}; try: tinygpt classify --checkpoint {run_dir} \"some text\"")
    return 0


def _classify(args) -> int:
    from tinygpt.checkpoint import load_checkpoint
    from tinygpt.finetune.classify import classify
    from tinygpt.finetune.lora import merge_lora

    checkpoint = load_checkpoint(args.checkpoint, device=args.device, bpe_file=args.bpe_file, optimizer=False)
    settings = (checkpoint.trainer_state or {}).get("meta", {})
    if settings.get("task") != "classify" or checkpoint.kind != "classifier":
        raise UsageError(f"{checkpoint.path} is not a classifier from `tinygpt finetune-classify` but a language model; "
                         f"continue text with `tinygpt generate --checkpoint {args.checkpoint} --prompt TEXT`")
    empty = [i + 1 for i, text in enumerate(args.texts) if not text.strip()]
    if empty:
        raise UsageError(f"TEXT {empty[0]} of {len(args.texts)} is empty: there is nothing to classify")
    model = merge_lora(checkpoint.model)
    for text in args.texts:
        label, probs = classify(text, model, checkpoint.tokenizer, settings["labels"], settings["max_length"])
        print(f"{label}\t" + "  ".join(f"{name} {p:.3f}" for name, p in probs.items()) + f"\t{text}")
    return 0


# ------------------------------------------------------------------ instruction following (chapter 7)

def _finetune_instruct(args, start: Start) -> int:
    from tinygpt.data import DataLoader
    from tinygpt.finetune.instruct import (InstructionDataset, InstructionTrainer, load_instruction_data,
                                           split_instruction_data, write_responses)
    from tinygpt.finetune.lora import replace_linear_with_lora

    model, tokenizer, settings, run_dir, checkpoint = start.model, start.tokenizer, start.settings, start.run_dir, start.checkpoint
    eot = getattr(tokenizer, "eot_token", None)
    if eot is None:
        raise ValueError(f"instruction finetuning needs a tokenizer with an end-of-text token; {args.resume or args.init} "
                         f"uses a {type(tokenizer).__name__}, which has none (train with --tokenizer gpt2 or bpe)")
    if checkpoint is None:
        settings.update(train_frac=args.train_frac or 0.85, test_frac=args.test_frac if args.test_frac is not None else 0.1,
                        mask_prompt=bool(args.mask_prompt),
                        allowed_max_length=min(args.max_length or 1024, model.cfg["context_length"]), default_epochs=2)
        if settings["lora"]:
            replace_linear_with_lora(model, **settings["lora"])
    train, val, test = split_instruction_data(load_instruction_data(settings["data"]), settings["train_frac"], settings["test_frac"])
    print(f"data: {settings['data']}: {len(train)} train / {len(val)} val / {len(test)} test records")
    datasets = []
    for name, records in (("training", train), ("validation", val)):
        dataset = InstructionDataset(records, tokenizer, eot, settings["allowed_max_length"], settings["mask_prompt"])
        if dataset.dropped:
            print(f"warning: dropped {dataset.dropped} of {len(records)} {name} records: nothing of their response "
                  f"fits in {settings['allowed_max_length']} tokens{' after the masked prompt' if settings['mask_prompt'] else ''}"
                  f" (raise --max-length up to the context, {model.cfg['context_length']}, or shorten them)", file=sys.stderr)
        if not len(dataset):
            raise UsageError(f"no {name} record of {settings['data']} keeps any response token within "
                             f"{settings['allowed_max_length']} tokens: nothing to learn from")
        datasets.append(dataset)
    check_batch(datasets[0], "records", settings)
    config = train_config(args, settings, checkpoint)
    train_loader = DataLoader(datasets[0], settings["batch_size"], shuffle=True, drop_last=True, seed=settings["seed"])
    val_loader = DataLoader(datasets[1], settings["batch_size"])
    trainer = InstructionTrainer(model, make_optimizer(model, config), train_loader, val_loader, tokenizer, config,
                                 out_dir=run_dir, progress=not args.no_progress, meta=settings, sample_entry=val[0])
    if not run_trainer(trainer, start):
        return 130
    records = test[:args.responses] if args.responses is not None else test
    if records:
        path = run_dir / "test-responses.json"
        print(f"answering {len(records)} held-out instructions into {path}")
        if distributed.is_main():  # data parallel: one rank writes
            write_responses(path, records, model, tokenizer, args.max_new_tokens, show=print)
    print(f"saved {run_dir}; try: tinygpt chat --checkpoint {run_dir} \"Name a primary color.\"")
    return 0


def _chat(args) -> int:
    import tinygpt as tg
    from tinygpt.checkpoint import load_language_model
    from tinygpt.finetune.instruct import generate_response, template_response
    from tinygpt.finetune.lora import merge_lora
    from tinygpt.generate import StreamPrinter

    from tinygpt.hf_llama import is_llama_folder

    respond = generate_response
    if is_llama_folder(args.checkpoint):  # a Hugging Face Llama/Qwen3 folder: its own chat template
        from tinygpt.pretrained import load_model_and_tokenizer

        (model, tokenizer), respond = load_model_and_tokenizer(args.checkpoint, args.device), template_response
    else:
        checkpoint = load_language_model(args.checkpoint, args.device, args.bpe_file, "chat")
        model, tokenizer = merge_lora(checkpoint.model), checkpoint.tokenizer
    v.check_top_k(args.top_k, model.cfg["vocab_size"])
    tg.manual_seed(args.seed)
    interactive = args.instruction is None
    if interactive and sys.stdin.isatty():
        print("Type an instruction and press Enter (Ctrl-D to quit).")
    elif not interactive and not args.instruction.strip():
        raise UsageError("the INSTRUCTION is empty; give one, or none to read them from stdin")
    instructions = [args.instruction] if not interactive else (line.strip() for line in sys.stdin)
    for instruction in instructions:
        if not instruction:
            continue
        stream = StreamPrinter(tokenizer, stop_id=getattr(tokenizer, "eot_token", None))
        respond(model, tokenizer, {"instruction": instruction, "input": args.input or ""}, args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, on_token=stream)
        stream.finish()
        sys.stdout.write("\n")
    return 0


def _download(args) -> int:
    if args.dir and os.path.exists(args.dir) and not os.path.isdir(args.dir):  # refused before the download
        raise UsageError(f"--dir {args.dir} is a file, not a folder")
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
    p.add_argument("--data", type=v.existing_file, help="the data file (required unless --resume; "
                   "with --resume: continue on this file instead of the run's own)")
    p.add_argument("--init", help=f"gpt2, gpt2-medium, ... (downloaded once), a Hugging Face GPT-2 folder, "
                                  f"or a `tinygpt train` run (default {init_default})")
    p.add_argument("--epochs", type=v.positive_int, help=f"default {epochs_default}, as the book")
    p.add_argument("--max-steps", type=v.positive_int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=v.positive_int, help=f"default {BOOK['batch_size']}")
    p.add_argument("--lr", type=v.positive, help=f"default {BOOK['lr']}; with --resume, e.g. a lower one after a divergence")
    p.add_argument("--weight-decay", type=v.non_negative, help=f"default {BOOK['weight_decay']}")
    p.add_argument("--max-length", type=v.positive_int, help="truncate examples to this many tokens")
    p.add_argument("--lora-rank", type=v.positive_int, help="train LoRA adapters of this rank instead of the weights (appendix E)")
    p.add_argument("--lora-alpha", type=v.positive, help=f"default {NEW_RUN['lora_alpha']}")
    p.add_argument("--eval-freq", type=v.positive_int, help=f"evaluate every this many steps (default {eval_freq})")
    p.add_argument("--eval-iter", type=v.positive_int, help=f"batches per evaluation (default {NEW_RUN['eval_iter']})")
    p.add_argument("--checkpoint-every", type=v.count, help=f"0: only at the end (default {NEW_RUN['checkpoint_every']})")
    p.add_argument("--out", help=f"run directory (default {out_default}); with --resume: branch into this new directory")
    p.add_argument("--resume", metavar="DIR", type=v.existing_path, help="continue the run saved in DIR")
    p.add_argument("--reset-optimizer", action="store_true", help="with --resume: restart AdamW's running averages (when its state is lost)")
    p.add_argument("--seed", type=v.seed, help=f"default {NEW_RUN['seed']}")
    p.add_argument("--device", choices=["cpu", "cuda", "strict"], help="default $TINYGPT_DEVICE or cpu")
    p.add_argument("--bpe-file", type=v.existing_file, help="local GPT-2 ranks file for offline use (or TINYGPT_BPE_FILE)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="data parallel over the ranks MPI started (automatic under mpiexec/mpirun)")
    p.set_defaults(init_default=init_default, out_default=out_default, eval_freq_default=eval_freq)


def _finetune(task: str, body):
    """The command: check the options, start or resume the run, and hold its directory's lock."""
    def run(args) -> int:
        from tinygpt.checkpoint import checkpoints
        from tinygpt.rundir import RunLock

        if not args.resume:
            if not args.data:
                raise UsageError("--data FILE is required (unless --resume DIR)")
            if args.reset_optimizer:
                raise UsageError("--reset-optimizer applies only with --resume DIR")
            args.init, args.out = args.init or args.init_default, args.out or args.out_default
            args.eval_freq = args.eval_freq or args.eval_freq_default
            if task == "instruct":  # a malformed data file is refused before the model is downloaded
                from tinygpt.finetune.instruct import load_instruction_data

                load_instruction_data(args.data)
            else:
                from tinygpt.finetune.classify import read_labelled_file

                read_labelled_file(args.data, args.text_column or "Text", args.label_column or "Label")
        start = start_run(args, task)
        with RunLock(start.run_dir):
            if start.checkpoint is None and (checkpoints(start.run_dir) or (start.run_dir / "latest").exists()):
                raise UsageError(f"{start.run_dir} already holds a run; continue it with --resume {start.run_dir}, "
                                 f"or pick another --out")
            return body(args, start)
    return run


def add_commands(sub) -> None:
    p = sub.add_parser("finetune-classify", help="finetune a GPT into a text classifier (book chapter 6)")
    _common(p, "gpt2", "runs/classifier", 5, 50)
    p.add_argument("--text-column", help="default Text")
    p.add_argument("--label-column", help="default Label")
    p.add_argument("--balance", action="store_true", default=None, help="undersample every label to the rarest one's count")
    p.add_argument("--train-frac", type=v.fraction, help="default 0.7")
    p.add_argument("--val-frac", type=v.fraction, help="default 0.1")
    p.add_argument("--trainable-blocks", type=v.count, help="train this many top transformer blocks (default 1)")
    p.add_argument("--train-all", dest="trainable_blocks", action="store_const", const="all",
                   help="train the whole model, embeddings included")
    p.set_defaults(run=_finetune("classify", _finetune_classify))

    p = sub.add_parser("classify", help="label texts with a model from `tinygpt finetune-classify`")
    p.add_argument("--checkpoint", required=True, metavar="DIR", type=v.existing_path)
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--device", choices=["cpu", "cuda", "strict"], help="default $TINYGPT_DEVICE or cpu")
    p.add_argument("--bpe-file", type=v.existing_file)
    p.set_defaults(run=_classify)

    p = sub.add_parser("finetune-instruct", help="finetune a GPT to follow instructions (book chapter 7)")
    _common(p, "gpt2-medium", "runs/instruct", 2, 5)
    p.add_argument("--train-frac", type=v.fraction, help="default 0.85")
    p.add_argument("--test-frac", type=v.real(at_least=0, below=1), help="default 0.1")
    p.add_argument("--mask-prompt", action="store_true", default=None, help="score only the response tokens")
    p.add_argument("--sample-tokens", type=v.count, help="length of the responses shown while training (default 50)")
    p.add_argument("--max-new-tokens", type=v.count, default=256, help="longest response to the held-out instructions")
    p.add_argument("--responses", type=v.count, help="answer only the first N held-out instructions (default: all)")
    p.set_defaults(run=_finetune("instruct", _finetune_instruct))

    p = sub.add_parser("chat", help="answer instructions with a model from `tinygpt finetune-instruct`")
    p.add_argument("--checkpoint", required=True, metavar="DIR", type=v.existing_path,
                   help="a finetune-instruct run, or a Hugging Face Llama/Qwen3 instruct folder (its chat template)")
    p.add_argument("instruction", nargs="?", help="one instruction (default: read one per line from stdin)")
    p.add_argument("--input", help="the optional input field of the prompt")
    p.add_argument("--max-new-tokens", type=v.count, default=256)
    p.add_argument("--temperature", type=v.non_negative, default=0.0)
    p.add_argument("--top-k", type=v.positive_int)
    p.add_argument("--seed", type=v.seed, default=123)
    p.add_argument("--device", choices=["cpu", "cuda", "strict"], help="default $TINYGPT_DEVICE or cpu")
    p.add_argument("--bpe-file", type=v.existing_file)
    p.set_defaults(run=_chat)

    from tinygpt.pretrained import GPT2_NAMES

    p = sub.add_parser("download", help="fetch GPT-2 weights or the SMS Spam Collection ahead of time")
    p.add_argument("name", choices=[*GPT2_NAMES, "sms-spam"])
    p.add_argument("--dir", help="where to put it (default: the weights cache, or ./data for sms-spam)")
    p.set_defaults(run=_download)
