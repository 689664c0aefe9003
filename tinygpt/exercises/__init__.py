"""Write the backward yourself: one exercise per fused op and one for a whole transformer
block, each checked against tinygpt's own backward and float64 finite differences.

    tinygpt exercise list
    tinygpt exercise start layer_norm            # writes layer_norm.py: the forward and a stub
    tinygpt exercise check layer_norm layer_norm.py [--show-solution]

From Python (the walk-through uses this):
    result = run_check("layer_norm", "layer_norm.py")
    print(result.report()); result.passed; result.grads
    wrong, right = layer_norm_walkthrough("some/folder")   # a first try with two mistakes, then the fix
"""
from __future__ import annotations

import inspect
from pathlib import Path

from tinygpt.exercises import checker
from tinygpt.exercises.block_case import BLOCK
from tinygpt.exercises.checker import CheckResult, GradResult
from tinygpt.exercises.registry import OPS, Exercise
from tinygpt.exercises.walkthrough import layer_norm_walkthrough
from tinygpt.files import atomic_write_text

EXERCISES: dict[str, Exercise] = {e.name: e for e in (*OPS, BLOCK)}

__all__ = ["EXERCISES", "CheckResult", "GradResult", "UnknownExercise", "check_main", "get", "layer_norm_walkthrough", "run_check", "sheet_text",
           "solution_text", "start"]


class UnknownExercise(ValueError):
    pass


def get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise UnknownExercise(f"unknown exercise {name!r}; choose from: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def run_check(name: str, path) -> CheckResult:
    """Check the backward in the file at `path` against exercise `name`."""
    return checker.run_check(get(name), path)


def sheet_text(name: str) -> str:
    """The file `start` writes: the forward, its math and shapes, and a backward stub."""
    return inspect.getsource(get(name).sheet)


def solution_text(name: str) -> str:
    """The engine's own backward for the exercise's op (for the block, the answer key)."""
    return get(name).solution()


def start(name: str, directory=".", force: bool = False) -> Path:
    """Write the exercise sheet to directory/name.py; FileExistsError rather than overwrite."""
    path = Path(directory) / f"{name}.py"
    text = sheet_text(name)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it (your work in it would be lost)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def check_main(name: str, path, show_solution: bool = False) -> int:
    """Print the check of `path` (and the engine's solution if asked); 0 when it passes."""
    result = run_check(name, path)
    print(result.report())
    if show_solution:
        print(f"\n{'=' * 30} tinygpt's own backward for {name} {'=' * 30}\n{solution_text(name)}")
    return 0 if result.passed else 1
