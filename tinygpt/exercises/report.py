"""The text of a check: one block per gradient, then the verdict.

Help comes in levels, so a learner can ask for as little as they need:
    0  which gradients are wrong, and their worst element;
    1  also where the wrong elements lie (and, in the block, which one to fix first);
    2  also the mistake, named, with the paragraph that explains it."""
from __future__ import annotations

import textwrap

NEXT_LEVEL = {0: "for a hint, check again with --hint (where the wrong elements are), then --hint 2 (the mistake)",
              1: "to have the mistake named, check again with --hint 2"}


def format_report(result, level: int = 2) -> str:
    lines = [f"check {result.exercise}: {result.path}"]
    if result.printed:
        lines.append(result.printed.rstrip("\n"))
    if result.error is not None:
        return "\n".join(lines + [result.error, "FAIL: nothing was checked"])
    word = "gradient" if result.kind == "backward" else "output"
    lines += [result.summary, "each gradient is compared with tinygpt's own backward and with central differences"
              if result.kind == "backward" else "each output is compared with tinygpt's own ops and with the plain, "
              "untiled NumPy computation", ""]
    width = max(len(g.name) for g in result.grads)
    shape_width = max(len(str(g.shape or g.expected_shape)) for g in result.grads)
    for g in result.grads:
        lines += _gradient_lines(g, width, shape_width, level, result.kind)
    lines.append("")
    wrong = result.wrong
    if result.memory:
        lines.append(_wrap(result.memory, ""))
    if not wrong and result.memory:
        lines.append(f"FAIL: every {word} is right, but not computed tile by tile")
        return "\n".join(lines)
    if not wrong:
        lines.append(f"PASS: the {word} is right" if len(result.grads) == 1 else f"PASS: all {len(result.grads)} {word}s right")
        return "\n".join(lines)
    if result.first_wrong and level >= 1 and len(wrong) > 1:
        inherit = [g.name for g in wrong if g.inherits]
        lines.append(f"the first gradient going backward that is wrong on its own is {result.first_wrong}: fix it first"
                     + (f" ({', '.join(inherit)} only inherit errors from the gradients they are computed from)" if inherit else ""))
    if level < 2 and any(g.where or g.hint for g in wrong):
        lines.append(NEXT_LEVEL[level])
    if len(result.grads) == 1:
        lines.append(f"FAIL: the {word} is wrong ({wrong[0].name})")
    else:
        lines.append(f"FAIL: {len(wrong)} of {len(result.grads)} {word}s wrong ({', '.join(g.name for g in wrong)})")
    return "\n".join(lines)


def _gradient_lines(g, width: int, shape_width: int, level: int, kind: str = "backward") -> list:
    shape = "missing" if g.shape is None else str(g.shape)
    shape_ok = "ok" if g.shape == g.expected_shape else f"wrong, expected {g.expected_shape}"
    head = f"  {g.name:<{width}}  shape {shape:<{shape_width}} {shape_ok:<3}  "
    pad = " " * (width + 4)
    notes = [_wrap(f"note: {g.note}", pad)] if g.note else []
    second = "finite differences" if kind == "backward" else "the plain computation"
    if g.status == "exact":
        return [f"{head}exact  ({second} agree{'s' if kind != 'backward' else ''} to {g.diff_numeric:.1e})"] + notes
    if g.status == "close":
        return [f"{head}close  max |yours - expected| {g.diff_engine:.1e} (vs {second} {g.diff_numeric:.1e})"] + notes
    lines = [head + "WRONG" + (f"  max |yours - expected| {g.diff_engine:.3g}" if g.diff_engine is not None else "")]
    if g.inherits and level >= 1:
        whose = "its" if len(g.inherits) == 1 else "their"
        if g.where.startswith("not finite"):
            return [lines[0] + f"  (not finite, computed from your {', '.join(g.inherits)}, not finite either)"]
        return [lines[0] + f"  (right given your {', '.join(g.inherits)}: only inherits {whose} error)"]
    if g.worst is not None:
        index, theirs, expected, numeric = g.worst
        lines.append(f"{pad}worst element {list(index)}: yours {theirs:.6g}, expected {expected:.6g} ({second} {numeric:.6g})")
    if g.problem:
        lines.append(_wrap(g.problem, pad))
    if level >= 1 and g.where:
        lines.append(_wrap(f"where: {g.where}", pad))
    if level >= 2 and g.hint and g.hint != g.where:
        lines.append(_wrap(f"hint: {g.hint}", pad))
    return lines + notes


def _wrap(text: str, pad: str) -> str:
    return textwrap.fill(text, 110, initial_indent=pad, subsequent_indent=pad + "  ")
