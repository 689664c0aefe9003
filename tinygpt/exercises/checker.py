"""Check a learner's backward: run it (in a child process, under the engine's rules), then
compare every gradient with tinygpt's own backward and with float64 central differences,
and name the mistakes.

Nothing the learner's file does (fail to import, raise, exit, loop, return the wrong thing)
shows a traceback of ours: it becomes one clear message in the CheckResult, with the lines
of their own file that raised, if any. The verdict is made here, from the numbers alone."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinygpt.exercises import child, diagnose, hints, sandbox
from tinygpt.exercises.registry import Exercise, copy, sheet_numeric


@dataclass
class GradResult:
    name: str
    status: str                         # "exact", "close" or "wrong"
    shape: tuple | None                 # the shape of theirs (None when it has none)
    expected_shape: tuple
    diff_engine: float | None = None    # max |theirs - tinygpt's backward|
    diff_numeric: float | None = None   # max |theirs - central differences|
    worst: tuple | None = None          # (index, theirs, expected, numeric) of the worst element
    problem: str | None = None          # not an array of the right kind: always shown
    where: str | None = None            # hint level 1: where the wrong elements are
    hint: str | None = None             # hint level 2: the mistake, named
    mistake: str | None = None          # the catalogue's key of the mistake found, if any
    note: str | None = None             # said even when right (a float32 gradient)
    inherits: tuple = ()                # the wrong gradients it is computed from, when right given them


@dataclass
class CheckResult:
    exercise: str
    path: str
    grads: list = field(default_factory=list)
    error: str | None = None            # why nothing was compared (file missing, stub left, ...)
    summary: str = ""                   # the inputs the check ran on
    printed: str = ""                   # what the learner's file printed, quoted
    first_wrong: str | None = None      # in data-flow order, the first gradient wrong on its own
    kind: str = "backward"              # "forward": outputs of the learner's functions are checked
    memory: str | None = None           # a backward that held more at once than the exercise allows

    @property
    def passed(self) -> bool:
        return (self.error is None and self.memory is None and bool(self.grads)
                and all(g.status != "wrong" for g in self.grads))

    @property
    def wrong(self) -> list:
        return [g for g in self.grads if g.status == "wrong"]

    def report(self, hints: int = 2) -> str:
        """The text of the check; `hints` 0 says only which gradients are wrong, 1 also where,
        2 also names the mistake."""
        from tinygpt.exercises.report import format_report

        return format_report(self, hints)


def run_check(exercise: Exercise, path, seed: int = 0, timeout: float = sandbox.DEFAULT_TIMEOUT) -> CheckResult:
    """Check the file at `path`, run in a child process that may take `timeout` seconds."""
    result = CheckResult(exercise.name, str(path), kind=exercise.kind)
    inputs, dout = exercise.draw(np.random.default_rng(seed))
    result.summary = _describe(inputs, dout, exercise.kind)
    try:
        returned = sandbox.run_in_child(exercise, path, inputs, dout, timeout)
    except sandbox.ChildFailed as e:
        result.error = str(e)
        return result
    result.printed = returned["printed"]
    return _judge(exercise, result, inputs, dout, returned, seed)


def check_function(exercise: Exercise, backward, forward=None, seed: int = 0) -> CheckResult:
    """Check `backward` (and `forward`, default the sheet's) in this process, under the same
    rules and with the same diagnosis. For code you trust (tests, the walk-through): it runs
    here, so it could change the checker. For a forward exercise, `backward` is an object
    holding the functions the sheet asks for (a module, a class, a namespace)."""
    path = Path(inspect.getsourcefile(backward) or "<backward>")
    result = CheckResult(exercise.name, f"{path}:{backward.__name__}", kind=exercise.kind)
    inputs, dout = exercise.draw(np.random.default_rng(seed))
    result.summary = _describe(inputs, dout, exercise.kind)
    try:
        if exercise.driver:
            run = child.run_forward(getattr(exercise.sheet, exercise.driver), backward, copy(inputs), path,
                                    what=f"your {' or '.join(exercise.fill)}")
        else:
            reference, _ = exercise.sheet.forward(*copy(inputs).values())
            run = child.run_backward(forward or exercise.sheet.forward, backward, copy(inputs), dout, path, reference,
                                     measure=exercise.memory is not None)
        returned = child.collect(run, exercise.grads, "finish" if exercise.driver else "backward")
    except child.LearnerStop as e:
        result.error = str(e)
        return result
    return _judge(exercise, result, inputs, dout, returned, seed)


def _judge(exercise: Exercise, result: CheckResult, inputs, dout, returned: dict, seed: int) -> CheckResult:
    result.error = _forward_error(exercise, inputs, returned) if exercise.kind == "backward" else None
    if returned["changed"] and result.error is None:
        who = "backward" if exercise.kind == "backward" else "code"
        result.error = f"your {who} changed {', '.join(returned['changed'])} in place. {child.READ_ONLY_WHY}"
    if result.error is not None:
        return result
    if exercise.memory is not None:
        result.memory = _memory_problem(exercise, inputs, returned.get("peak"))
    engine = exercise.engine(copy(inputs), dout)
    numeric = _numeric(exercise, seed)
    case = lambda name: hints.Case(name, exercise.dims, inputs, dout)  # noqa: E731
    theirs = {}
    for name in exercise.grads:
        if not hints.same(engine[name], numeric[name]):  # a bug of ours, not the learner's
            raise RuntimeError(f"exercise {exercise.name}: tinygpt's backward and finite differences disagree on {name}")
        grad, theirs[name] = compare(name, returned["grads"].get(name), returned["kinds"].get(name), engine[name],
                                     numeric[name], case(name))
        result.grads.append(grad)
    result.first_wrong = diagnose.diagnose(exercise, result.grads, theirs, engine, inputs, dout, returned.get("fp"))
    return result


def _memory_problem(exercise: Exercise, inputs, peak) -> str | None:
    limit, meaning = exercise.memory(inputs)
    if peak is None:
        return "the check could not measure what your backward held at once, so it cannot say it works tile by tile"
    if peak <= limit:
        return None
    return f"your backward held {peak:,} bytes at once, more than the {limit:,} a tiled backward needs: {meaning}"


def _forward_error(exercise: Exercise, inputs, returned: dict) -> str | None:
    reference, _ = exercise.sheet.forward(*copy(inputs).values())
    out = returned["out"]
    if out is None and returned.get("out_kind"):
        return f"your forward's output is {returned['out_kind']}; keep its output as `start` wrote it (an array)"
    try:
        same = out is not None and out.dtype.kind in "biuf" and hints.same(np.asarray(out, dtype=np.float64), reference)
    except (TypeError, ValueError):
        same = False
    if same:
        return None
    return ("your forward computes something else than the exercise's forward; keep its output as `start` wrote it "
            "(saving more in the cache is fine)")


def compare(name: str, theirs, kind, expected, numeric, case: hints.Case) -> tuple:
    """(GradResult, theirs as float64 or None): how `theirs` compares with the engine's
    `expected` and with the finite differences. Hints are added later, by diagnose."""
    if theirs is None:
        problem = f"backward returned no {name}" if kind in (None, child.MISSING) else f"{name} is {kind}"
        return GradResult(name, "wrong", None, expected.shape, problem=problem), None
    result = GradResult(name, "wrong", tuple(theirs.shape), expected.shape)
    result.problem, result.note = hints.dtype_problem(name, theirs.dtype)
    if result.problem:
        return result, None
    theirs = np.asarray(theirs, dtype=np.float64)
    if theirs.shape != expected.shape:
        return result, theirs
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
    return result, theirs


@functools.lru_cache(maxsize=None)
def _numeric(exercise: Exercise, seed: int) -> dict:
    """The finite differences of the exercise's forward on the inputs of `seed`. They depend
    on nothing else, so they are computed once per process (the block's take a second)."""
    inputs, dout = exercise.draw(np.random.default_rng(seed))
    return (exercise.numeric or functools.partial(sheet_numeric, exercise))(inputs, dout)


def _describe(inputs: dict, dout, kind: str = "backward") -> str:
    parts = [f"{n} {np.shape(a)}" if not isinstance(a, dict) else f"{len(a)} parameters" for n, a in inputs.items()]
    upstream = f"; upstream gradient {np.shape(dout) or float(dout)}" if kind == "backward" else ""
    return f"inputs {', '.join(parts)}{upstream}; float64"
