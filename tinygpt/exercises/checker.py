"""Check a learner's backward: import their file, run it, compare every gradient with
tinygpt's own backward and with float64 central differences, and name the mistakes.

Nothing the learner's file does (fail to import, raise, return the wrong thing) shows a
traceback of ours: it becomes one clear message in the CheckResult, with the lines of
their own file that raised, if any."""
from __future__ import annotations

import functools
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinygpt.exercises import hints
from tinygpt.exercises.registry import Exercise, sheet_numeric


class LearnerError(Exception):
    """Something about the learner's file stops the check; the message says what."""


@dataclass
class GradResult:
    name: str
    status: str                         # "exact", "close" or "wrong"
    shape: tuple | None                 # the shape of theirs (None when they returned none)
    expected_shape: tuple
    diff_engine: float | None = None    # max |theirs - tinygpt's backward|
    diff_numeric: float | None = None   # max |theirs - central differences|
    worst: tuple | None = None          # (index, theirs, expected, numeric) of the worst element
    hint: str | None = None


@dataclass
class CheckResult:
    exercise: str
    path: str
    grads: list = field(default_factory=list)
    error: str | None = None            # why nothing was compared (file missing, stub left, ...)
    summary: str = ""                   # the inputs the check ran on

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.grads) and all(g.status != "wrong" for g in self.grads)

    @property
    def wrong(self) -> list:
        return [g for g in self.grads if g.status == "wrong"]

    def report(self) -> str:
        from tinygpt.exercises.report import format_report

        return format_report(self)


def run_check(exercise: Exercise, path, seed: int = 0) -> CheckResult:
    result = CheckResult(exercise.name, str(path))
    inputs, dout = exercise.draw(np.random.default_rng(seed))
    result.summary = _describe(inputs, dout)
    try:
        module = load(path, exercise.name)
        theirs = _their_gradients(module, exercise, inputs, dout, Path(path))
    except LearnerError as e:
        result.error = str(e)
        return result
    engine = exercise.engine(_copy(inputs), dout)
    numeric = _numeric(exercise, seed)
    case = lambda name: hints.Case(name, exercise.dims, inputs, dout)  # noqa: E731
    for name in exercise.grads:
        if not hints.same(engine[name], numeric[name]):  # a bug of ours, not the learner's
            raise RuntimeError(f"exercise {exercise.name}: tinygpt's backward and finite differences disagree on {name}")
        result.grads.append(compare(name, theirs.get(name), engine[name], numeric[name], case(name), exercise.hints))
    return result


@functools.lru_cache(maxsize=None)
def _numeric(exercise: Exercise, seed: int) -> dict:
    """The finite differences of the exercise's forward on the inputs of `seed`. They depend
    on nothing else, so they are computed once per process (the block's take a second)."""
    inputs, dout = exercise.draw(np.random.default_rng(seed))
    return (exercise.numeric or functools.partial(sheet_numeric, exercise))(inputs, dout)


def load(path, name: str):
    """The learner's file as a module, or LearnerError saying why it cannot be imported."""
    path = Path(path)
    if not path.is_file():
        raise LearnerError(f"{path}: no such file; write one with: tinygpt exercise start {name}")
    spec = importlib.util.spec_from_file_location(f"tinygpt_exercise_{name}", path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so their file may import a helper next to it
    sys.modules[spec.name] = module  # as a normal import does (dataclasses in their file look it up)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise LearnerError(f"{path}:{e.lineno}: cannot import your file: SyntaxError: {e.msg}") from None
    except (Exception, SystemExit) as e:
        raise LearnerError(their_traceback(e, path, f"importing {path}")) from None
    finally:
        sys.path.remove(folder)
        sys.modules.pop(spec.name, None)
    for function in ("forward", "backward"):
        if not callable(getattr(module, function, None)):
            raise LearnerError(f"{path} defines no function {function}(); start from the sheet: tinygpt exercise start {name}")
    return module


def their_traceback(error: BaseException, path: Path, what: str) -> str:
    """The traceback lines that are in the learner's file, then one line naming the error."""
    mine = Path(path).resolve()
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == mine]
    return "".join(traceback.format_list(frames)) + f"{what} failed: {type(error).__name__}: {error}"


def _call(path: Path, what: str, function, *args):
    try:
        return function(*args)
    except NotImplementedError:
        raise LearnerError(f"{path}: {what} still raises NotImplementedError: fill it in, then check again") from None
    except Exception as e:
        raise LearnerError(their_traceback(e, path, f"your {what}")) from None


def _their_gradients(module, exercise: Exercise, inputs, dout, path: Path) -> dict:
    reference, _ = exercise.sheet.forward(*_copy(inputs).values())
    result = _call(path, "forward", module.forward, *_copy(inputs).values())
    if not (isinstance(result, tuple) and len(result) == 2):
        raise LearnerError(f"{path}: forward must return (output, cache) as the sheet's does")
    try:
        out = np.asarray(result[0], dtype=np.float64)
    except (TypeError, ValueError):
        out = None
    if out is None or not hints.same(out, reference):
        raise LearnerError(f"{path}: your forward computes something else than the exercise's forward; keep its "
                           "output as `start` wrote it (saving more in the cache is fine)")
    returned = _call(path, "backward", module.backward, np.array(dout, dtype=np.float64), result[1])
    return _by_name(returned, exercise.grads, path)


def _by_name(returned, names: tuple, path: Path) -> dict:
    """backward's result as {gradient name: value}: a dict, a tuple in the documented order,
    or a single array when there is one gradient."""
    if isinstance(returned, dict):
        return {n: returned.get(n, returned.get(n.removeprefix("d"))) for n in names}
    if len(names) == 1 and not isinstance(returned, (tuple, list)):
        return {names[0]: returned}
    if isinstance(returned, (tuple, list)) and len(returned) == len(names):
        return dict(zip(names, returned))
    got = f"{len(returned)} values" if isinstance(returned, (tuple, list)) else f"a {type(returned).__name__}"
    raise LearnerError(f"{path}: backward returned {got}; expected {len(names)}: ({', '.join(names)})")


def compare(name: str, theirs, expected, numeric, case: hints.Case, extra=()) -> GradResult:
    """How `theirs` compares with the engine's `expected` and with the finite differences."""
    if theirs is None:
        return GradResult(name, "wrong", None, expected.shape, hint=f"backward returned no {name}")
    try:
        theirs = np.asarray(theirs, dtype=np.float64)
    except (TypeError, ValueError):
        return GradResult(name, "wrong", None, expected.shape, hint=f"{name} is not an array of numbers")
    result = GradResult(name, "wrong", theirs.shape, expected.shape)
    if theirs.shape != expected.shape:
        result.hint = hints.shape_hint(theirs, expected, case)
        return result
    error = np.abs(theirs - expected)
    error[~np.isfinite(error)] = np.inf
    result.diff_engine, result.diff_numeric = float(error.max(initial=0.0)), float(np.abs(theirs - numeric).max(initial=0.0))
    if result.diff_engine <= 1e-13 * max(1.0, float(np.abs(expected).max(initial=0.0))):
        result.status = "exact"
    elif hints.same(theirs, expected) and hints.same(theirs, numeric):
        result.status = "close"
    else:
        worst = np.unravel_index(int(error.argmax()), error.shape)
        result.worst = (tuple(int(i) for i in worst), float(theirs[worst]), float(expected[worst]), float(numeric[worst]))
        result.hint = hints.not_finite(theirs) or hints.hint(theirs, expected, case, extra)
    return result


def _copy(inputs: dict) -> dict:
    """Fresh copies, so nothing the learner's code changes in place reaches the next step."""
    return {n: ({k: v.copy() for k, v in a.items()} if isinstance(a, dict) else np.array(a)) for n, a in inputs.items()}


def _describe(inputs: dict, dout) -> str:
    parts = [f"{n} {np.shape(a)}" if not isinstance(a, dict) else f"{len(a)} parameters" for n, a in inputs.items()]
    return f"inputs {', '.join(parts)}; upstream gradient {np.shape(dout) or float(dout)}; float64"
