"""Which code runs an op: its plain math, or a fast version of it.

Every fused op of tinygpt.functional (and AdamW's update in optim.py) is written once as plain
whole-array math: the reference a learner reads and steps through. tinygpt.kernels.fused
registers faster versions under the same names (blocked on the CPU's cores, fused CUDA
kernels), and `implementation` is the one place that chooses between them. Function.apply
asks it for every op, AdamW for its update.

The plain math runs on the strict backend (how the tests prove it runs on CuPy), and
everywhere when the fast versions are switched off: TINYGPT_KERNELS=plain, or
set_kernels("plain"). So a learner can step through the reference math in a debugger on a
real GPT run, and a benchmark can show what each fast version buys.
"""
from __future__ import annotations

import os
from typing import Any

from tinygpt.backend import device_of

MODES = ("fast", "plain")
_mode: str | None = None
_fast: dict[str, Any] = {}  # op name -> its fast version (kernels/fused.py registers them at import)


def _checked(mode, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    return mode


def set_kernels(mode: str) -> None:
    """"fast": the fused ops use the fast versions for their device; "plain": every op runs its
    plain reference math (the default comes from $TINYGPT_KERNELS, else "fast")."""
    global _mode
    _mode = _checked(mode, "kernels")


def kernels_mode() -> str:
    global _mode
    if _mode is None:
        _mode = _checked(os.environ.get("TINYGPT_KERNELS", "fast"), "TINYGPT_KERNELS")
    return _mode


def register(fast):
    """Class decorator (or function decorator) of kernels/fused.py: `fast` runs the op of the
    same name on the CPU and on CUDA."""
    _fast[fast.__name__] = fast
    return fast


def implementation(op, x):
    """What runs op (an op class of functional, or optim.adamw_step_) on array x: its fast
    version for x's device, or op itself."""
    fast = _fast.get(op.__name__)  # None for most ops (add, reshape, ...): no fast version
    if fast is None or (_mode or kernels_mode()) == "plain" or device_of(x) not in ("cpu", "cuda"):
        return op
    return fast
