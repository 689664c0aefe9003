"""Write the backward yourself: warm-ups for the small ops, one exercise per fused op (GPT-2's,
then the newer blocks: RMSNorm, RoPE, SwiGLU, grouped-query attention), FlashAttention's two
halves (online_softmax, where you write the forward's per-block step, and the tiled backward),
and one for a whole transformer block, each checked against tinygpt's own ops and float64
finite differences (a forward exercise: against the plain, untiled computation).

    tinygpt exercise list                        # the path, first to last, and what you passed
    tinygpt exercise start layer_norm            # writes layer_norm.py: the forward and a stub
    tinygpt exercise check layer_norm layer_norm.py [--hint [2]] [--timeout S] [--show-solution]

Your file runs in a child process, under the engine's rules (dy and the saved values are
read-only); only its arrays come back, and the verdict is made from them.

From Python (the walk-through uses this):
    result = run_check("layer_norm", "layer_norm.py")
    print(result.report()); result.passed; result.grads
    wrong, right = layer_norm_walkthrough("some/folder")   # a first try with two mistakes, then the fix
"""
from __future__ import annotations

from pathlib import Path

from tinygpt.exercises import checker, progress, sandbox
from tinygpt.exercises.block_case import BLOCK
from tinygpt.exercises.checker import CheckResult, GradResult
from tinygpt.exercises.modern import MODERN
from tinygpt.exercises.registry import OPS, Exercise
from tinygpt.exercises.walkthrough import layer_norm_walkthrough
from tinygpt.exercises.warmups import WARMUPS
from tinygpt.files import atomic_write_text

# the path, first to last: the small ops, the fused ops from the easiest, the newer blocks
# (RMSNorm, RoPE, SwiGLU, GQA) and FlashAttention's two halves, then the whole block
PATH = (*WARMUPS, *sorted(OPS, key=lambda e: ("easy", "medium", "hard").index(e.difficulty)), *MODERN, BLOCK)
EXERCISES: dict[str, Exercise] = {e.name: e for e in PATH}

__all__ = ["EXERCISES", "CheckResult", "GradResult", "UnknownExercise", "check_function", "check_main", "get",
           "layer_norm_walkthrough", "run_check", "sheet_text", "solution_text", "start"]


class UnknownExercise(ValueError):
    pass


def get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise UnknownExercise(f"unknown exercise {name!r}; choose from: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def run_check(name: str, path, timeout: float = sandbox.DEFAULT_TIMEOUT) -> CheckResult:
    """Check the backward in the file at `path` against exercise `name`; the file runs in a
    child process that may take `timeout` seconds."""
    return checker.run_check(get(name), path, timeout=timeout)


def check_function(name: str, backward, forward=None) -> CheckResult:
    """Check a backward function in this process (for code you trust: it could change the
    checker), under the same rules and with the same diagnosis as run_check."""
    return checker.check_function(get(name), backward, forward)


def sheet_text(name: str) -> str:
    """The file `start` writes: the forward, its math and shapes, and a backward stub."""
    return Path(get(name).sheet.__file__).read_text()


def solution_text(name: str) -> str:
    """The answer key's backward, plain math in the sheet's own interface."""
    return get(name).solution()


def start(name: str, directory=".", force: bool = False) -> Path:
    """Write the exercise sheet to directory/name.py; FileExistsError rather than overwrite."""
    path = Path(directory) / f"{name}.py"
    text = sheet_text(name)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give another --dir, or move the folder away")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it (your work in it would be lost)")
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder; give --dir a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def check_main(name: str, path, show_solution: bool = False, hint: int = 0, timeout: float = sandbox.DEFAULT_TIMEOUT) -> int:
    """Print the check of `path` with help up to level `hint` (and the solution if asked);
    0 only when every gradient was verified right. A pass is recorded next to the file."""
    result = run_check(name, path, timeout=timeout)
    print(result.report(hint))
    if result.passed:
        progress.record(Path(path).parent, name)
    if show_solution:
        print(f"\n{'=' * 30} the solution for {name} {'=' * 30}\n{solution_text(name)}")
    return 0 if result.passed else 1
