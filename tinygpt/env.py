"""The environment variables tinygpt reads, and the parsers of the numeric ones.

    TINYGPT_DEVICE        the default device: cpu, cuda or strict (default cpu)
    TINYGPT_KERNELS       fast or plain: which version of the fused ops runs (default fast)
    TINYGPT_NUM_THREADS   threads of the CPU kernels: a positive integer (default: the usable cores)
    TINYGPT_DIST_TIMEOUT  seconds before data-parallel ranks give up on a silent one (default 30)
    TINYGPT_BPE_FILE      a local copy of GPT-2's BPE ranks (gpt2.tiktoken)
    TINYGPT_CACHE         the folder of downloaded weights (default ~/.cache/tinygpt)

A parser is the one place its variable is read, so the check at start (validation.py) and the
code that uses the value agree: a value the start accepts never fails in the middle of a run.
A bad value raises ValueError naming the variable, the value and the limit. An empty value
counts as unset (`TINYGPT_NUM_THREADS= tinygpt ...`).
"""
from __future__ import annotations

import difflib
import math
import os
import re

KNOWN = ("TINYGPT_DEVICE", "TINYGPT_KERNELS", "TINYGPT_NUM_THREADS", "TINYGPT_DIST_TIMEOUT",
         "TINYGPT_BPE_FILE", "TINYGPT_CACHE")
# twice transport.HEARTBEAT_S (each rank says it is alive every second): any less, and one late
# heartbeat ends a healthy job
MIN_DIST_TIMEOUT = 2.0


def value(name: str, environ=None) -> str | None:
    """The variable's text without surrounding spaces, None when unset or empty."""
    text = (os.environ if environ is None else environ).get(name, "").strip()
    return text or None


def num_threads(environ=None) -> int | None:
    """TINYGPT_NUM_THREADS as a positive integer, None when unset. Only decimal digits pass:
    Python's int() would also take "+2" and "1_0"."""
    text = value("TINYGPT_NUM_THREADS", environ)
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ValueError(f"TINYGPT_NUM_THREADS must be a positive integer, got {text!r}")
    return int(text)


def dist_timeout(environ=None) -> float:
    """TINYGPT_DIST_TIMEOUT in seconds (default 30): a finite number >= MIN_DIST_TIMEOUT."""
    text = value("TINYGPT_DIST_TIMEOUT", environ)
    if text is None:
        return 30.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= MIN_DIST_TIMEOUT):
        raise ValueError(f"TINYGPT_DIST_TIMEOUT must be a finite number of seconds >= {MIN_DIST_TIMEOUT:g}, got {text!r}")
    return seconds


def unknown(environ=None) -> list[str]:
    """A line for each TINYGPT_* variable tinygpt does not read (a typo is otherwise ignored
    without a word), with the known name it most resembles."""
    environ = os.environ if environ is None else environ
    lines = []
    for name in sorted(n for n in environ if n.startswith("TINYGPT_") and n not in KNOWN):
        prefix = len("TINYGPT_")  # compared without it: every name shares it
        close = difflib.get_close_matches(name[prefix:], [k[prefix:] for k in KNOWN], n=1)
        hint = f"did you mean TINYGPT_{close[0]}?" if close else f"tinygpt reads {', '.join(KNOWN)}"
        lines.append(f"{name} is set, but tinygpt reads no such variable; {hint}")
    return lines
