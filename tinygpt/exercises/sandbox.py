"""Run a learner's file in a child process with a time limit, and read back only arrays.

The child (child.py) gets the inputs as an .npz file and answers with an .npz of arrays
(read here with allow_pickle=False, so nothing it sends can run code) and a JSON of words.
Whatever the child does to itself (sys.exit, os._exit, an endless loop, a thread left
running, numpy patched) cannot change a verdict: the parent makes it from the numbers."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from tinygpt.exercises.registry import copy

CHILD = Path(__file__).with_name("child.py")
DEFAULT_TIMEOUT = 20.0
PRINTED_LINES = 20                     # at most this many lines the learner printed are shown
MAX_FILE_BYTES = 64 * 2**20            # no file the child writes (its printing included) grows past this
VERDICT = re.compile(r"\b(PASS|FAIL)\b")


class ChildFailed(Exception):
    """The child gave no gradients; the message says why, in one line (or their lines)."""


def run_in_child(exercise, path, inputs: dict, dout, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """What child.collect returns ("out", "grads", "kinds", "changed", "fp") plus "printed"."""
    with tempfile.TemporaryDirectory(prefix="tinygpt-exercise-") as folder:
        job = Path(folder)
        _write_job(job, exercise, Path(path).absolute(), inputs, dout)
        printed = job / "printed.txt"
        with open(printed, "wb") as sink:
            process = subprocess.Popen([sys.executable, "-u", str(CHILD), str(job)], stdin=subprocess.DEVNULL,
                                       stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=_folder_of(path), preexec_fn=_limit_file_size)
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(process)
        shown = shown_output(printed)
        if code is None:
            raise ChildFailed(f"{shown}your file did not finish within {timeout:g} s (it was {_stage(job)}): an endless "
                              "loop, a sleep or a wait? The check stopped it; give it longer with --timeout SECONDS")
        answer = _read_answer(job, code)
        if answer.get("error"):
            raise ChildFailed(shown + neutral(str(answer["error"])))
        try:
            return {**_read_result(job, answer), "printed": shown}
        except (OSError, ValueError, TypeError, KeyError, AttributeError, zipfile.BadZipFile) as e:
            raise ChildFailed(f"{shown}the gradients your file sent back could not be read ({type(e).__name__}: "
                              f"{neutral(str(e))}): did your file write into the check's folder?") from None


def _read_result(job: Path, answer: dict) -> dict:
    """Arrays without pickle, words as strings: nothing read here can run code."""
    with np.load(job / "result.npz", allow_pickle=False) as arrays:
        grads = {k.removeprefix("grad."): np.asarray(arrays[k]) for k in arrays.files if k.startswith("grad.")}
        out = np.asarray(arrays["out"]) if "out" in arrays.files else None
    return {"out": out, "out_kind": _text(answer.get("out_kind")), "grads": grads,
            "kinds": {str(k): neutral(str(v)) for k, v in dict(answer.get("kinds") or {}).items()},
            "changed": [neutral(str(c)) for c in list(answer.get("changed") or [])], "fp": _text(answer.get("fp")),
            "peak": _bytes(answer.get("peak"))}


def _write_job(job: Path, exercise, path: Path, inputs: dict, dout) -> None:
    arrays, dicts = {"__dout__": np.asarray(dout, dtype=np.float64)}, {}
    if exercise.kind == "backward":  # a forward exercise's sheet forward is the learner's to fill in
        arrays["__reference__"] = np.asarray(exercise.sheet.forward(*copy(inputs).values())[0], dtype=np.float64)
    for name, value in inputs.items():
        if isinstance(value, dict):
            dicts[name] = list(value)
            arrays.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            arrays[name] = np.asarray(value)
    np.savez(job / "inputs.npz", **arrays)
    (job / "job.json").write_text(json.dumps({"path": str(path), "exercise": exercise.name, "inputs": list(inputs),
                                              "dicts": dicts, "grads": list(exercise.grads), "fill": list(exercise.fill),
                                              "driver": exercise.driver, "measure": exercise.memory is not None}))


def _limit_file_size() -> None:
    """In the child, before it starts: a print loop cannot fill the disk (the kernel stops it)."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))


def _folder_of(path) -> str:
    folder = Path(path).absolute().parent
    return str(folder) if folder.is_dir() else os.getcwd()


def _kill_group(process) -> None:
    """The child and anything it started (a subprocess, a fork): all of them end here."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _stage(job: Path) -> str:
    try:
        return (job / "stage").read_text().strip() or "starting"
    except OSError:
        return "starting"


def _read_answer(job: Path, code: int) -> dict:
    try:
        answer = json.loads((job / "result.json").read_text())
    except (OSError, ValueError):
        answer = None
    if not isinstance(answer, dict) or (not answer.get("error") and not (job / "result.npz").exists()):
        if code == -signal.SIGXFSZ:
            raise ChildFailed(f"your file wrote more than {MAX_FILE_BYTES // 2**20} MB (printing in a loop?), so the check "
                              "stopped it")
        how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise ChildFailed(f"your file ended the check's process while {_stage(job)} ({how}), so no gradients came "
                          "back: no sys.exit / os._exit / atexit tricks in the file; backward must return its gradients")
    return answer


def _bytes(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _text(value):
    return None if value is None else neutral(str(value))


def neutral(text: str) -> str:
    """Text that came from the learner's process, with any PASS / FAIL words taken out: only
    the checker's own last line is a verdict."""
    return VERDICT.sub(lambda m: m.group(0).lower(), text)


def shown_output(printed: Path) -> str:
    """The last lines the learner's file printed, quoted, for print-debugging."""
    try:
        text = printed.read_bytes()[-8000:].decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    head = f"your file printed {len(lines)} line{'s' if len(lines) > 1 else ''}" + (f"; the last {PRINTED_LINES}:" if len(lines) > PRINTED_LINES else ":")
    return "\n".join([head] + [f"  | {neutral(line)}" for line in lines[-PRINTED_LINES:]]) + "\n"
