"""Ways to look at a Trace: a text table (per module or per node), Graphviz DOT text, and a
self-contained HTML page. Host-side formatting only; the records are in trace.py."""
from __future__ import annotations

import html
import math
from collections import Counter


def module_label(module: str | None) -> str:
    return "(outside modules)" if module is None else module or "(outermost module)"


def _under(module: str | None, prefix: str | None) -> bool:
    return prefix is None or (module is not None and (module == prefix or module.startswith(prefix + ".")))


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "()"


def _ops(names) -> str:
    counts = Counter(names)
    return ", ".join(f"{op}x{n}" if n > 1 else op for op, n in counts.items())


LEGEND = """columns: nodes are the row's backward nodes (#: the order backward ran them); |dL/d out| is the L2 norm
of the gradient that arrived at the row's output (its first node's), |grad| that of one node, and min, max and
zeros (the share of exact zeros) describe the same gradient; saved is what the ops hold from forward to backward,
weights included; ms is backward time; inputs are the nodes (#N) and parameters (.name, below the row's module)
that the row reads from outside itself."""


def table(t, flat: bool = False, under: str | None = None) -> str:
    nodes = [n for n in t.nodes if _under(n.module, under)]
    unseen = sum(not n.forward_seen for n in nodes)
    lines = []
    if unseen:
        lines += [f"{unseen} of {len(nodes)} nodes were made before the trace began, so their source lines and "
                  "forward statistics are unknown: run the forward inside `with tg.trace()` too", ""]
    lines += _flat(t, nodes) if flat else _grouped(t, nodes)
    seconds, saved = sum(n.seconds for n in nodes), sum(n.saved_bytes for n in nodes)
    lines.append(f"{len(nodes)} backward nodes, {seconds * 1e3:.2f} ms in backward, {_bytes(saved)} saved for backward")
    lines += ["", LEGEND]
    leaves = [leaf for leaf in t.leaves if under is None or (leaf.name or "").startswith(under + ".")]
    if leaves:
        lines += ["", *_parameters(leaves)]
    stats = [m for key, m in t.modules.items() if _under(None if key == "(outside modules)" else key, under)]
    if stats:
        lines += ["", *_forward(stats)]
    return "\n".join(lines)


def runs(nodes) -> list[list]:
    """The nodes cut into runs of one module, in the order backward ran them: a module whose
    nodes backward reached at two times (a block's two residual Adds) gets two rows."""
    groups: list[list] = []
    for n in nodes:
        if groups and groups[-1][0].module == n.module:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _inputs(t, nodes, module: str | None) -> str:
    """What nodes read from outside themselves: "#12" for a node, ".weight" for a parameter
    of `module` (its full name otherwise)."""
    inside, seen = {n.index for n in nodes}, []
    for n in nodes:
        for i in n.inputs:
            if isinstance(i, int):
                text = None if i in inside else f"#{i}"
            elif isinstance(i, str):
                name = t.leaves[int(i.split(":")[1])].name
                text = (name[len(module):] if name and module and name.startswith(module + ".")
                        else name or f"leaf {i.split(':')[1]}")
            else:
                text = None
            if text and text not in seen:
                seen.append(text)
    return " ".join(seen) or "-"


def _grouped(t, nodes) -> list[str]:
    groups = runs(nodes)
    width = max([len(module_label(g[0].module)) for g in groups] + [6])
    lines = [f"{'module':<{width}}  {'nodes':>9}  {'|dL/d out|':>10}  {'saved':>9}  {'ms':>7}  {'inputs':<24}  "
             "ops (first ran first)"]
    for group in groups:
        # the first node backward ran in a module made its output: its gradient is the module's
        span = f"#{group[0].index}" + (f"-{group[-1].index}" if len(group) > 1 else "")
        lines.append(f"{module_label(group[0].module):<{width}}  {span:>9}  {group[0].grad_norm:>10.3e}  "
                     f"{_bytes(sum(n.saved_bytes for n in group)):>9}  {sum(n.seconds for n in group) * 1e3:>7.3f}  "
                     f"{_inputs(t, group, group[0].module):<24}  {_ops(n.op for n in group)}")
    return lines


def _flat(t, nodes) -> list[str]:
    width = max([len(module_label(n.module)) for n in nodes] + [6])
    lines = [f"{'#':>4}  {'op':<26}  {'module':<{width}}  {'output':<14}  {'|grad|':>9}  {'min':>10}  {'max':>10}  "
             f"{'zeros':>5}  {'saved':>9}  {'ms':>7}  inputs"]
    for n in nodes:
        lines.append(f"{n.index:>4}  {n.op:<26}  {module_label(n.module):<{width}}  {_shape(n.shape):<14}  {n.grad_norm:>9.3e}  "
                     f"{n.grad_min:>10.3e}  {n.grad_max:>10.3e}  {n.grad_zeros:>5.0%}  {_bytes(n.saved_bytes):>9}  "
                     f"{n.seconds * 1e3:>7.3f}  {_inputs(t, [n], n.module)}")
    return lines


def _parameters(leaves) -> list[str]:
    width = max(len(leaf.name or f"leaf {leaf.index}") for leaf in leaves)
    lines = ["parameter gradients (.grad when the trace ended)",
             f"{'parameter':<{width}}  {'shape':<12}  {'|grad|':>9}  {'min':>10}  {'max':>10}  {'zeros':>5}"]
    for leaf in leaves:
        lines.append(f"{leaf.name or f'leaf {leaf.index}':<{width}}  {_shape(leaf.shape):<12}  {leaf.grad_norm:>9.3e}  "
                     f"{leaf.grad_min:>10.3e}  {leaf.grad_max:>10.3e}  {_share(leaf.grad_zeros):>5}")
    return lines


def _share(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.0%}"


def _forward(stats) -> list[str]:
    width = max(len(m.module or "(outermost module)") for m in stats)
    lines = ["forward statistics (means over calls)",
             f"{'module':<{width}}  {'kind':<18}  {'out mean':>9}  {'out std':>8}  {'GELU |x|>3':>10}  attention entropy per head (nats)"]
    for m in stats:
        tail = "" if m.gelu_tail is None else f"{m.gelu_tail:.1%}"
        entropy = "" if m.attention_entropy is None else " ".join(f"{e:.2f}" for e in m.attention_entropy)
        mean, std = (f"{m.out_mean:>9.3f}", f"{m.out_std:>8.3f}") if m.calls else (f"{'':>9}", f"{'':>8}")
        lines.append(f"{m.module or '(outermost module)':<{width}}  {m.kind:<18}  {mean}  {std}  {tail:>10}  {entropy}")
    return lines


# ============================================================================ DOT


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _norm(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3g}"


def to_dot(t) -> str:
    """Forward direction (inputs above, loss at the bottom); each op node shows its module,
    output shape and the norm of the gradient that arrived at it; each parameter its
    gradient's norm, range and share of zeros."""
    lines = ["digraph backward {", '  node [shape=box, fontname="monospace", fontsize=10];', "  rankdir=TB;"]
    for leaf in t.leaves:
        text = (f"{leaf.name or 'leaf'}\n{_shape(leaf.shape)}\n|grad| {_norm(leaf.grad_norm)}\n"
                f"min {_norm(leaf.grad_min)} max {_norm(leaf.grad_max)}\nzeros {_share(leaf.grad_zeros) or 'nan'}")
        lines.append(f"  leaf{leaf.index} [shape=ellipse, label={_quote(text)}];")
    for n in t.nodes:
        text = f"#{n.index} {n.op}\n{module_label(n.module)}\n{_shape(n.shape)} {n.dtype}\n|grad| {_norm(n.grad_norm)}"
        lines.append(f"  n{n.index} [label={_quote(text)}];")
    for n in t.nodes:
        for i in n.inputs:
            if i is None:
                continue
            source = f"leaf{i.split(':')[1]}" if isinstance(i, str) else f"n{i}"
            lines.append(f"  {source} -> n{n.index};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ============================================================================ HTML


_STYLE = """body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}
td,th{padding:2px 8px;text-align:right;font-family:monospace}td.l,th.l{text-align:left}
details{margin:4px 0}summary{cursor:pointer;font-family:monospace}.bar{background:#4a7;height:8px;display:inline-block}"""


def to_html(t) -> str:
    """One folding section per module, its nodes in a table with a bar for each gradient norm."""
    groups: dict = {}
    for n in t.nodes:
        groups.setdefault(n.module, []).append(n)
    top = max([n.grad_norm for n in t.nodes if math.isfinite(n.grad_norm)] + [1e-30])
    parts = [f"<!doctype html><meta charset=utf-8><title>tinygpt backward trace</title><style>{_STYLE}</style>",
             f"<h1>Backward trace</h1><p>{len(t.nodes)} nodes in the order backward ran them; "
             "each module's first node made its output.</p>"]
    for module, group in groups.items():
        rows = "".join(
            f"<tr><td>{n.index}</td><td class=l>{html.escape(n.op)}</td><td class=l>{_shape(n.shape)}</td>"
            f"<td>{n.grad_norm:.3e}</td><td class=l><span class=bar style='width:{120 * n.grad_norm / top:.0f}px'></span></td>"
            f"<td>{n.grad_min:.2e}</td><td>{n.grad_max:.2e}</td><td>{n.grad_zeros:.0%}</td><td>{_bytes(n.saved_bytes)}</td>"
            f"<td>{n.seconds * 1e3:.3f}</td><td class=l>{html.escape(n.op_line or '')}</td></tr>" for n in group)
        parts.append(f"<details><summary>{html.escape(module_label(module))} — {len(group)} nodes, "
                     f"|dL/d out| {group[0].grad_norm:.3e}</summary><table><tr><th>#</th><th class=l>op</th>"
                     f"<th class=l>output</th><th>|grad|</th><th></th><th>min</th><th>max</th><th>zeros</th>"
                     f"<th>saved</th><th>ms</th><th class=l>created at</th></tr>{rows}</table></details>")
    if t.leaves:
        grads = "\n".join(_parameters(t.leaves))
        parts.append(f"<h2>Parameter gradients</h2><pre>{html.escape(grads)}</pre>")
    if t.modules:
        stats = "\n".join(_forward(list(t.modules.values())))
        parts.append(f"<h2>Forward statistics</h2><pre>{html.escape(stats)}</pre>")
    return "\n".join(parts) + "\n"
