"""`tinygpt trace`: one forward and backward of a GPT on real text, printed node by node.

With no options: the small model of `tinygpt train` (random init), the text that ships with
Python and its character tokenizer; a second or two on a CPU. `--model gpt2-small` builds
the GPT-2 shape (random init, nothing downloaded); `--checkpoint DIR` traces a trained run.
"""
from __future__ import annotations

import os

from tinygpt import validation as v
from tinygpt.validation import UsageError


def _model_and_tokenizer(args):
    """(model, tokenizer, what it is) for the options given."""
    import tinygpt as tg
    from tinygpt.data import CharTokenizer, default_corpus, gpt2_tokenizer
    from tinygpt.model import GPT_PRESETS, GPTModel
    from tinygpt.train_cli import DEFAULT_MODEL

    if args.checkpoint:
        from tinygpt.checkpoint import load_language_model

        checkpoint = load_language_model(args.checkpoint, args.device, args.bpe_file, "trace")
        return checkpoint.model, checkpoint.tokenizer, f"checkpoint {checkpoint.path}"
    tg.manual_seed(args.seed)
    if args.model:
        gpt2_tokens = args.bpe_file or os.environ.get("TINYGPT_BPE_FILE")
        # a random-init model only needs valid ids: characters serve when GPT-2's ranks are not at hand
        tokenizer = gpt2_tokenizer(args.bpe_file) if gpt2_tokens else CharTokenizer.from_text(default_corpus())
        words = "GPT-2 tokens" if gpt2_tokens else "character ids (give --bpe-file for GPT-2 tokens)"
        return GPTModel(GPT_PRESETS[args.model]), tokenizer, f"{args.model} shape, random init, {words}"
    tokenizer = CharTokenizer.from_text(default_corpus())
    model = GPTModel({**DEFAULT_MODEL, "vocab_size": tokenizer.n_vocab})
    return model, tokenizer, "the default model of `tinygpt train`, random init, character tokens"


def _batch(tokenizer, batch_size: int, tokens: int):
    """(inputs, targets), each [B, T]: consecutive windows of the default text."""
    import numpy as np

    from tinygpt.data import default_corpus, encode_text

    needed = batch_size * tokens + 1
    text = default_corpus()
    ids = encode_text(tokenizer, text[: 8 * needed])  # a token is at least one character
    if len(ids) < needed:
        raise UsageError(f"--batch-size {batch_size} x --tokens {tokens} needs {needed} tokens, "
                         f"the default text has {len(ids)}")
    ids = np.asarray(ids[:needed], dtype=np.int64)
    return ids[:-1].reshape(batch_size, tokens), ids[1:].reshape(batch_size, tokens)


OUTPUTS = ("dot", "json", "html")


def _check_outputs(args) -> None:
    """Every --dot/--json/--html path writable and free (or --force), before the run."""
    from tinygpt.files import check_output

    named = [(option, getattr(args, option)) for option in OUTPUTS if getattr(args, option) is not None]
    for option, path in named:
        check_output(path, f"--{option}", force=args.force)
    paths = [os.path.realpath(path) if path != "-" else path for _, path in named]
    for i, (option, path) in enumerate(named):
        if paths[i] in paths[:i] and not _writes_directly(path):
            first = named[paths.index(paths[i])][0]
            raise UsageError(f"--{first} and --{option} both name {path}; give each its own file")


def _writes_directly(path: str) -> bool:
    from tinygpt.files import writes_directly

    return path == "-" or writes_directly(path)


def _only(args, model) -> str | None:
    """The module path that --layer / --module keep (with their children), checked against the model."""
    if args.layer is None and args.module is None:
        return None
    blocks = model.cfg["n_layers"]
    if args.layer is not None and args.layer >= blocks:
        raise UsageError(f"--layer must be < the model's {blocks} blocks (0 to {blocks - 1}), got {args.layer}")
    block = None if args.layer is None else f"trf_blocks.{args.layer}"
    path = ".".join(p for p in (block, args.module) if p)
    names = dict(model.named_modules())
    if path not in names:
        where = f"below {block}" if block else "in the model"
        choices = sorted({n[len(block) + 1:] if block else n.split(".")[0] for n in names
                          if n and (block is None or n.startswith(block + "."))})
        raise UsageError(f"--module {args.module}: no such module {where}; choose from {', '.join(choices)}")
    return path


def run_trace(args) -> int:
    import sys

    import tinygpt as tg
    import tinygpt.functional as F
    from tinygpt.files import write_output

    _check_outputs(args)
    # an output sent to standard output ("-") keeps it for itself: the report goes to stderr
    out = sys.stderr if "-" in (args.dot, args.json, args.html) else sys.stdout
    model, tokenizer, what = _model_and_tokenizer(args)
    context = model.cfg["context_length"]
    if args.tokens > context:
        raise UsageError(f"--tokens must be <= the model's context_length {context}, got {args.tokens}")
    only = _only(args, model)
    x, y = _batch(tokenizer, args.batch_size, args.tokens)
    model.train()
    with tg.trace() as t:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    print(f"{what}: {model.num_parameters():,} parameters; batch {args.batch_size} x {args.tokens} tokens "
          f"of the default text; loss {loss.item():.4f}", file=out)
    print("backward nodes in the order they ran" + (" (flat)" if args.flat else ", per module run")
          + (f", only {only} and below" if only else "") + ":\n", file=out)
    print(t.table(flat=args.flat, module=only), file=out)
    for path, text in ((args.dot, t.to_dot), (args.json, t.to_json), (args.html, t.to_html)):
        if path is not None:
            write_output(path, text(), force=args.force)
            print(f"wrote {'standard output' if path == '-' else path}", file=out)
    return 0


def add_commands(sub) -> None:
    from tinygpt.model import GPT_PRESETS

    p = sub.add_parser("trace", help="run one forward and backward on real text and print every backward node")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="DIR", type=v.existing_path, help="a run or checkpoint folder written by `tinygpt train`")
    source.add_argument("--model", choices=list(GPT_PRESETS), help="a GPT-2 shape, random init (default: the small model of `tinygpt train`)")
    p.add_argument("--batch-size", type=v.positive_int, default=2, help="default 2")
    p.add_argument("--tokens", type=v.positive_int, default=64, help="tokens per row (default 64)")
    p.add_argument("--flat", action="store_true", help="one line per node instead of one per module")
    p.add_argument("--layer", type=v.count, help="only transformer block N (trf_blocks.N) in the table")
    p.add_argument("--module", metavar="PATH", help="only this module and those below it in the table, e.g. "
                   "trf_blocks.0.att, or att with --layer 0")
    p.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz DOT text (draw it with: dot -Tsvg FILE -o graph.svg); "
                   "- for standard output")
    p.add_argument("--json", metavar="FILE", help="also write every record as JSON")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page, one folding section per module")
    p.add_argument("--force", action="store_true", help="replace --dot/--json/--html files that exist (default: refuse)")
    p.add_argument("--bpe-file", type=v.existing_file, help="local GPT-2 ranks file (or TINYGPT_BPE_FILE)")
    p.add_argument("--seed", type=v.seed, default=123, help="seed of the random init (default 123)")
    p.add_argument("--device", choices=["cpu", "cuda", "strict"], help="default $TINYGPT_DEVICE or cpu")
    p.set_defaults(run=run_trace)
