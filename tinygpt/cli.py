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
