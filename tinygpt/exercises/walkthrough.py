"""The layer_norm exercise as the walk-through (scripts/backprop_tour.py) does it: write the
sheet, fill in a first try with two classic mistakes, check it, fix both, check again."""
from __future__ import annotations

from pathlib import Path

from tinygpt.files import atomic_write_text

STUB = '    raise NotImplementedError("write dx, dscale and dshift, then return them")'

FIRST_TRY = """\
    dxhat = dy * scale
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True))  # forgot that rstd depends on x too
    dscale = (dy * xhat).sum(axis=(0, 1))
    dshift = dy.sum(axis=0)                                     # summed over B, not over B and T
    return dx, dscale, dshift"""

FIXED = """\
    dxhat = dy * scale
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    dscale = (dy * xhat).sum(axis=(0, 1))
    dshift = dy.sum(axis=(0, 1))
    return dx, dscale, dshift"""


def layer_norm_walkthrough(directory) -> tuple:
    """(check of the first try, check of the fixed one), both written to directory/layer_norm.py
    in turn. Print each with `.report()`; the first fails, the second passes."""
    from tinygpt import exercises

    path = exercises.start("layer_norm", directory, force=True)
    sheet = Path(path).read_text()
    results = []
    for body in (FIRST_TRY, FIXED):
        atomic_write_text(path, sheet.replace(STUB, body))
        results.append(exercises.run_check("layer_norm", path))
    return tuple(results)
