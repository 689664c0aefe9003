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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (RuntimeError, ValueError) as e:
        print(f"tinygpt: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
