"""The `tinygpt` command."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings

from tinygpt import distributed, validation
from tinygpt.errors import RunError
from tinygpt.validation import UsageError


def _gradcheck(args) -> int:
    import tinygpt as tg
    from tinygpt.opsuite import cases

    suite = cases(args.device, seed=args.seed)
    unknown = [op for op in args.ops if op not in suite]
    if unknown:
        raise UsageError(f"unknown op(s): {', '.join(unknown)}; choose from: {', '.join(suite)}")
    failures, names = 0, args.ops or list(suite)
    width = max(len(suite[name][0]) for name in names)
    print(f"gradcheck on {args.device}, eps={args.eps}, atol={args.atol}, rtol={args.rtol}")
    print(f"{'op':<18} {'inputs':<{width}} {'max abs err':>12} {'max rel err':>12}  result")
    for name in names:
        shape, fn, inputs = suite[name]
        report = tg.gradcheck_report(fn, inputs, eps=args.eps, atol=args.atol, rtol=args.rtol)
        failures += not report.passed
        print(f"{name:<18} {shape:<{width}} {report.max_abs_error:>12.2e} {report.max_rel_error:>12.2e}  "
              f"{'pass' if report.passed else 'FAIL'}")
        if not report.passed:
            print(f"    {report.describe()}")
    print(f"{len(names) - failures} passed, {failures} failed")
    return 1 if failures else 0


def _info(args) -> int:
    from tinygpt.llama import LLAMA_PRESETS, preset_summary
    from tinygpt.model import GPT_PRESETS, count_parameters, parameter_table, size_mb

    if args.model in LLAMA_PRESETS:
        print("\n".join(preset_summary(args.model)))
        return 0
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


def _generate(args) -> int:
    import time

    import tinygpt as tg
    from tinygpt.generate import StreamPrinter, generate, text_to_token_ids

    if args.checkpoint:
        from tinygpt.checkpoint import load_language_model

        checkpoint = load_language_model(args.checkpoint, args.device, args.bpe_file, "generate")
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
    else:
        from tinygpt.data import gpt2_tokenizer
        from tinygpt.hf_llama import is_llama_folder
        from tinygpt.pretrained import load_gpt2, load_model_and_tokenizer

        if is_llama_folder(args.model):  # a Hugging Face Llama/Qwen3/Mistral folder and its tokenizer.json
            model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
        else:
            model, tokenizer = load_gpt2(args.model, device=args.device), gpt2_tokenizer(args.bpe_file)
    validation.check_top_k(args.top_k, model.cfg["vocab_size"])
    tg.manual_seed(args.seed)
    prompt = text_to_token_ids(args.prompt, tokenizer)
    if prompt.shape[1] == 0:
        raise UsageError("--prompt is empty: generation needs at least one token to continue")
    stream = StreamPrinter(tokenizer)
    sys.stdout.write(args.prompt)
    started = time.perf_counter()
    generate(model, prompt, args.max_new_tokens, model.cfg["context_length"], temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, eos_id=getattr(tokenizer, "eot_token", None), use_cache=not args.no_cache, on_token=stream)
    seconds = time.perf_counter() - started
    stream.finish()
    sys.stdout.write("\n")
    n = len(stream.ids)
    c = model.cfg  # the cache holds keys and values of the kv heads (all heads for GPT-2) for context_length tokens
    kv_heads, head_dim = c.get("n_kv_heads", c["n_heads"]), c.get("head_dim", c["emb_dim"] // c["n_heads"])
    cache = 2 * c["n_layers"] * kv_heads * head_dim * c["context_length"] * model.tok_emb.weight.dtype.itemsize
    size = f"{cache / 1024**2:.1f} MB" if cache >= 1024**2 else f"{cache / 1024:.1f} KB"
    cached = "" if args.no_cache else (f"; KV cache {size}: {c['context_length']} tokens x {c['n_layers']} layers x "
                                       f"{kv_heads} of {c['n_heads']} heads")
    print(f"[{n} tokens in {seconds:.1f} s, {n / max(seconds, 1e-9):.1f} tokens/s{cached}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = validation.Parser(prog="tinygpt", description="A GPT you can read: NumPy/CuPy engine with hand-written gradients.",
                                     epilog="Exit status: 0 done, 1 the run failed, 2 a mistake in the command or "
                                            "environment, 130 interrupted (Ctrl-C).")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gradcheck", help="check every op's backward against finite differences (in float64)")
    p.add_argument("ops", nargs="*", help="ops to check (default: all)")
    p.add_argument("--device", choices=["cpu", "cuda", "strict"], help="default $TINYGPT_DEVICE or cpu")
    # central differences in float64 lose digits to rounding below ~1e-10 and to curvature above ~0.1
    p.add_argument("--eps", type=validation.real(at_least=1e-10, at_most=0.1), default=1e-6,
                   help="finite-difference step, 1e-10 to 0.1 (default 1e-6)")
    p.add_argument("--atol", type=validation.non_negative, default=1e-5)
    p.add_argument("--rtol", type=validation.non_negative, default=1e-3)
    p.add_argument("--seed", type=validation.seed, default=0)
    p.set_defaults(run=_gradcheck)

    from tinygpt.llama import LLAMA_PRESETS
    from tinygpt.model import GPT_PRESETS

    p = sub.add_parser("info", help="parameter counts and memory of a GPT or Llama preset, module by module")
    p.add_argument("--model", default="gpt2-small", choices=list(GPT_PRESETS) + list(LLAMA_PRESETS))
    p.set_defaults(run=_info)

    from tinygpt.train_cli import add_command

    add_command(sub)

    p = sub.add_parser("generate", help="continue a prompt with GPT-2 or a model trained with `tinygpt train`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded once) or a Hugging Face "
                        "GPT-2, Llama, Qwen3 or Mistral folder")
    source.add_argument("--checkpoint", metavar="DIR", type=validation.existing_path, help="a run or checkpoint folder written by `tinygpt train`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=validation.count, default=50)
    p.add_argument("--temperature", type=validation.non_negative, default=0.0, help="0 for greedy decoding")
    p.add_argument("--top-k", type=validation.positive_int)
    p.add_argument("--top-p", type=validation.probability, help="nucleus sampling: in (0, 1]")
    p.add_argument("--seed", type=validation.seed, default=123)
    p.add_argument("--device", choices=["cpu", "cuda", "strict"], help="default $TINYGPT_DEVICE or cpu")
    p.add_argument("--bpe-file", type=validation.existing_file, help="local GPT-2 ranks file for offline use (or TINYGPT_BPE_FILE)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.set_defaults(run=_generate)

    from tinygpt.finetune.cli import add_commands

    add_commands(sub)
    from tinygpt.exercises.cli import add_commands as add_exercise_commands

    add_exercise_commands(sub)
    from tinygpt.trace_cli import add_commands as add_trace_commands

    add_trace_commands(sub)
    from tinygpt.compare import add_command as add_compare_command

    add_compare_command(sub)
    return parser


# Errors that come from what the user asked for or what the machine lacks (a file, a value, a
# download, a GPU, memory): one line. Anything else, a bare RuntimeError included, is a broken
# invariant of tinygpt's own code and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RunError, MemoryError)
REPORT_BUG = ("tinygpt: internal error: this is a bug in tinygpt, not a mistake in the command; "
              "please report it with the command line and the traceback above")


@distributed.end_every_rank_on_failure
def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status: 0 done, 1 the run failed, 2 a mistake in
    the command line or the environment, 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, so it can be added to any command line
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (2), or the help (0)
        return e.code if isinstance(e.code, int) else 2
    # a diverging run overflows on the way; the loss and checkpoint checks say so in one line
    warnings.filterwarnings("ignore", message="(overflow|invalid value|divide by zero) encountered", category=RuntimeWarning)
    try:
        validation.check_environment()
        if hasattr(args, "distributed"):  # under mpiexec: join the other ranks; only rank 0 prints
            distributed.init(force=args.distributed, device=args.device or os.environ.get("TINYGPT_DEVICE") or "cpu")
            if not distributed.is_main():
                sys.stdout = open(os.devnull, "w")
            elif distributed.world_size() > 1:
                print(distributed.describe())
        validation.choose_device(args)
        return args.run(args)
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 141
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        message = str(e) or type(e).__name__
        print(f"tinygpt: error: {message}" if isinstance(e, (ValueError, OSError, RunError)) else
              f"tinygpt: error: {type(e).__name__}: {message}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except Exception:
        traceback.print_exc()
        print(REPORT_BUG, file=sys.stderr)
        return 1


def entry() -> None:
    """The `tinygpt` command (and `python -m tinygpt`): main(), then exit with its status.
    After a Ctrl-C (status 130) Python still has to shut down (atexit handlers, threads); a
    second Ctrl-C in that moment would print a traceback from inside the shutdown, or kill
    the process by the signal (status -2, not 130). The user has asked to stop and we are
    stopping, so further Ctrl-Cs are ignored from here on."""
    code = main()
    if code == 130:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
