"""`tinygpt exercise list [--dir D] | start NAME [--dir D] [--force] |
check NAME FILE [--hint [2]] [--timeout S] [--show-solution]`."""
from __future__ import annotations

import argparse
import sys


def _list(args) -> int:
    from tinygpt.exercises import PATH, progress

    done = progress.passed(args.dir)
    width = max(len(e.name) for e in PATH)
    print("the exercises, a path from first to last (warm-ups first, the whole block last):\n")
    for step, e in enumerate(PATH, 1):
        mark = "passed" if e.name in done else ""
        print(f"{step:>2}. {e.name:<{width}}  {e.difficulty:<7}  {mark:<6}  {e.summary}")
    following = next((e.name for e in PATH if e.name not in done), None)
    print(f"\npassed {len(done & {e.name for e in PATH})} of {len(PATH)} (recorded in {args.dir})"
          + (f"; next: tinygpt exercise start {following}" if following else ""))
    print("start one with: tinygpt exercise start NAME   (writes NAME.py: the forward and a backward to fill in)")
    return 0


def _start(args) -> int:
    from tinygpt import exercises

    try:
        path = exercises.start(args.name, args.dir, force=args.force)
    except exercises.UnknownExercise as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(e if e.filename is None else f"cannot write {args.name}.py into {args.dir}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path}: fill in backward(), then run: tinygpt exercise check {args.name} {path}")
    return 0


def _check(args) -> int:
    from tinygpt import exercises

    try:
        exercises.get(args.name)
    except exercises.UnknownExercise as e:
        print(e, file=sys.stderr)
        return 2
    return exercises.check_main(args.name, args.file, show_solution=args.show_solution, hint=args.hint, timeout=args.timeout)


def _level(text: str) -> int:
    if text not in ("0", "1", "2"):
        raise argparse.ArgumentTypeError(f"--hint takes 1 or 2, got {text!r} (put the file before --hint)")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"--timeout must lie in (0, 3600] seconds, got {text}")
    return value


def add_commands(sub) -> None:
    p = sub.add_parser("exercise", help="write a backward pass yourself and have it checked")
    commands = p.add_subparsers(dest="exercise_command", required=True)
    c = commands.add_parser("list", help="the exercises, first to last, and which you passed")
    c.add_argument("--dir", default=".", help="your exercise folder, where passes are recorded (default: here)")
    c.set_defaults(run=_list)
    c = commands.add_parser("start", help="write NAME.py: the forward, its math and shapes, and a backward stub")
    c.add_argument("name")
    c.add_argument("--dir", default=".", help="folder to write NAME.py in (default: here)")
    c.add_argument("--force", action="store_true", help="overwrite NAME.py if it exists")
    c.set_defaults(run=_start)
    c = commands.add_parser("check", help="compare the backward in FILE with tinygpt's and with finite differences")
    c.add_argument("name")
    c.add_argument("file")
    c.add_argument("--hint", nargs="?", type=_level, const=1, default=0,
                   help="--hint: where the wrong elements are; --hint 2: the mistake, named")
    c.add_argument("--timeout", type=_seconds, default=20.0, help="seconds your file may run (default 20)")
    c.add_argument("--show-solution", action="store_true", help="then print the solution (the last resort)")
    c.set_defaults(run=_check)
