"""The text of a check: one block per gradient, then the verdict."""
from __future__ import annotations

import textwrap

from tinygpt.exercises import hints


def format_report(result) -> str:
    lines = [f"check {result.exercise}: {result.path}"]
    if result.error is not None:
        return "\n".join(lines + [result.error, "FAIL: nothing was checked"])
    lines += [result.summary, "each gradient is compared with tinygpt's own backward and with central differences", ""]
    width = max(len(g.name) for g in result.grads)
    shape_width = max(len(str(g.shape or g.expected_shape)) for g in result.grads)
    wrong = result.wrong
    for g in result.grads:
        # In the block, a gradient after the first wrong one is computed from wrong inputs:
        # unless its error has a pattern of its own, say only that it may be inherited.
        inherited = (result.exercise == "block" and g.status == "wrong" and g is not wrong[0]
                     and (g.hint or "").startswith(hints.GENERIC))
        lines += _gradient_lines(g, width, shape_width, inherited_from=wrong[0].name if inherited else None)
    lines.append("")
    if not wrong:
        lines.append("PASS: the gradient is right" if len(result.grads) == 1 else f"PASS: all {len(result.grads)} gradients right")
        return "\n".join(lines)
    if result.exercise == "block" and len(wrong) > 1:
        lines.append(f"the first wrong gradient going backward is {wrong[0].name}: fix it first, the ones after it may only inherit its error")
    lines.append(f"FAIL: {len(wrong)} of {len(result.grads)} gradients wrong ({', '.join(g.name for g in wrong)})")
    return "\n".join(lines)


def _gradient_lines(g, width: int, shape_width: int, inherited_from=None) -> list:
    shape = "missing" if g.shape is None else str(g.shape)
    shape_ok = "ok" if g.shape == g.expected_shape else f"wrong, expected {g.expected_shape}"
    head = f"  {g.name:<{width}}  shape {shape:<{shape_width}} {shape_ok:<3}  "
    pad = " " * (width + 4)
    if g.status == "exact":
        return [f"{head}exact  (finite differences agree to {g.diff_numeric:.1e})"]
    if g.status == "close":
        return [f"{head}close  max |yours - expected| {g.diff_engine:.1e} (vs finite differences {g.diff_numeric:.1e})"]
    lines = [head + "WRONG" + (f"  max |yours - expected| {g.diff_engine:.3g}" if g.diff_engine is not None else "")]
    if inherited_from is not None:
        return [lines[0] + f"  (may only inherit the error of {inherited_from})"]
    if g.worst is not None:
        index, theirs, expected, numeric = g.worst
        lines.append(f"{pad}worst element {list(index)}: yours {theirs:.6g}, expected {expected:.6g} (finite differences {numeric:.6g})")
    lines.append(textwrap.fill(g.hint, 110, initial_indent=f"{pad}hint: ", subsequent_indent=f"{pad}      "))
    return lines
