"""What trace() and detect_anomaly() both read off a graph node: where its op was created
(module path and source lines), the names of its inputs, and what it keeps for backward.

The origin is taken from the call stack at forward time, while someone watches, and kept on
the op (`ctx.origin`) for the reports made in backward."""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass

from tinygpt import hooks
from tinygpt.backend import is_array

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Files that run an op rather than ask for one: the line that *called* an op is outside them.
_ENGINE = {os.path.join(_PACKAGE, f) for f in ("tensor.py", "grads.py", "ops.py", "hooks.py", "trace.py",
                                                   "anomaly.py", "node_info.py")}
_ENGINE_FOLDERS = tuple(os.path.join(_PACKAGE, d) + os.sep for d in ("kernels", "functional"))


@dataclass
class Origin:
    """Where an op was created: its module path, the line that called it (may be inside
    tinygpt, e.g. nn.py in Linear.forward) and the first line of the user's own code."""
    module: str | None
    op_line: str | None
    user_line: str | None


def take_origin(ctx) -> Origin:
    """ctx's Origin: read from the call stack the first time an observer asks (at forward
    time), then kept on ctx so that backward reports the same place."""
    origin = ctx.__dict__.get("origin")
    if origin is None:
        op_line = user_line = None
        frame = sys._getframe(1)
        while frame is not None and user_line is None:
            path = os.path.abspath(frame.f_code.co_filename)
            if op_line is None and path not in _ENGINE and not path.startswith(_ENGINE_FOLDERS):
                op_line = _where(frame, path)
            if not path.startswith(_PACKAGE + os.sep):
                user_line = _where(frame, path)
            frame = frame.f_back
        origin = ctx.origin = Origin(hooks.current_module(), op_line, user_line)
    return origin


def user_line() -> str | None:
    """The first line outside tinygpt on the call stack: where the user's code asked."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_PACKAGE + os.sep):
            return _where(frame, path)
        frame = frame.f_back
    return None


def origin_of(ctx) -> Origin | None:
    """The Origin taken when ctx's forward ran, or None when nobody watched it then (asking
    the call stack now, in backward, would name the line that called backward)."""
    return ctx.__dict__.get("origin")


def _where(frame, path: str) -> str:
    if path.startswith(_PACKAGE + os.sep):
        shown = os.path.relpath(path, os.path.dirname(_PACKAGE))
    else:
        relative = os.path.relpath(path)
        shown = path if relative.startswith("..") else relative
    return f"{shown}:{frame.f_lineno} in {frame.f_code.co_name}"


def input_names(ctx) -> list[str]:
    """The names of an op's inputs, from its forward's signature (x, weight, bias, ...)."""
    params = list(inspect.signature(type(ctx).forward).parameters)[1:]
    return [params[i] if i < len(params) else f"input {i}" for i in range(len(ctx.inputs))]


def saved_arrays(ctx) -> list:
    """The arrays an op keeps for its backward: ctx.saved and the arrays among its attributes."""
    return [a for a in ctx.saved if is_array(a)] + [v for k, v in vars(ctx).items() if k != "saved" and is_array(v)]


def saved_bytes(ctx) -> int:
    """Bytes of the arrays an op keeps for its backward (weights it saved included)."""
    return sum(int(a.nbytes) for a in saved_arrays(ctx))
