"""`tinygpt exercise list | start NAME [--dir DIR] [--force] | check NAME FILE [--show-solution]`."""
from __future__ import annotations

import sys


def _list(args) -> int:
    from tinygpt.exercises import EXERCISES

    width = max(map(len, EXERCISES))
    for e in EXERCISES.values():
        print(f"{e.name:<{width}}  {e.difficulty:<6}  {e.summary}")
    print("\nstart one with: tinygpt exercise start NAME   (writes NAME.py: the forward and a backward to fill in)")
    return 0


def _start(args) -> int:
    from tinygpt import exercises

    try:
        path = exercises.start(args.name, args.dir, force=args.force)
    except exercises.UnknownExercise as e:
        print(e, file=sys.stderr)
        return 2
    except (FileExistsError, OSError) as e:
        print(e, file=sys.stderr)
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
    return exercises.check_main(args.name, args.file, show_solution=args.show_solution)


def add_commands(sub) -> None:
    p = sub.add_parser("exercise", help="write a backward pass yourself and have it checked")
    commands = p.add_subparsers(dest="exercise_command", required=True)
    c = commands.add_parser("list", help="the exercises, with their difficulty")
    c.set_defaults(run=_list)
    c = commands.add_parser("start", help="write NAME.py: the forward, its math and shapes, and a backward stub")
    c.add_argument("name")
    c.add_argument("--dir", default=".", help="folder to write NAME.py in (default: here)")
    c.add_argument("--force", action="store_true", help="overwrite NAME.py if it exists")
    c.set_defaults(run=_start)
    c = commands.add_parser("check", help="compare the backward in FILE with tinygpt's and with finite differences")
    c.add_argument("name")
    c.add_argument("file")
    c.add_argument("--show-solution", action="store_true", help="then print tinygpt's own backward for this op")
    c.set_defaults(run=_check)
