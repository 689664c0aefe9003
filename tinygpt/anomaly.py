"""detect_anomaly(): stop at the first op whose forward makes an inf or NaN, or whose
backward returns one, or whose saved input was changed in place before its backward ran,
and say where that op was created.

A NaN spreads: one bad weight makes a NaN activation, then a NaN loss, then NaN gradients
everywhere. Checking every op's result as it is made finds the first one, which is where
it was born, not where it surfaced. Every check costs a pass over the array, so this is for
hunting a bug, not for every run.

A backward computes its gradient from what its forward saved. If an input it saved is
changed in place in between (`w.data += 1`, an optimizer step before backward), the
gradient is that of another function, and nothing else would notice. Every assignment to
`Tensor.data` counts a version (`t._version`, as PyTorch's version counter does); the
detector notes the versions of the saved inputs at forward and compares them in backward,
naming the line that last assigned the tensor's .data while it watched.
Writing into the array's elements (`w.data[0] = 1`, AdamW's update) assigns nothing, so for
leaves (parameters, data) the detector also keeps a checksum of the values and compares it:
a changed sum is certain, an unchanged one may still hide a change that kept the sum.

    with tg.detect_anomaly():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    AnomalyError: detect_anomaly: the forward of Linear in trf_blocks.1.att.W_key produced NaN ...
"""
from __future__ import annotations

import weakref

from tinygpt import hooks
from tinygpt.backend import backend_of
from tinygpt.errors import RunError
from tinygpt.graph_state import watching
from tinygpt.node_info import input_names, origin_of, saved_arrays, take_origin, user_line
from tinygpt.tensor import Tensor


class AnomalyError(RunError):
    """What detect_anomaly() found: the message names the op, where it was made, and the cause."""


class detect_anomaly:
    """Context manager: an AnomalyError at the first non-finite forward result or gradient,
    or at a saved input changed in place before its backward, naming the op, its module
    path, its source lines and the input or gradient at fault."""

    def __init__(self):
        self._assigned: dict[int, tuple] = {}  # id(tensor) -> (weakref, the line that last assigned its .data)

    def __enter__(self) -> "detect_anomaly":
        watch = watching(self)
        watch.__enter__()  # refuses a detector that is already active (nested in itself)
        self._watch = watch
        return self

    def __exit__(self, *exc) -> None:
        self._watch.__exit__(*exc)

    def on_forward(self, ctx, inputs: tuple, out: Tensor) -> None:
        take_origin(ctx)
        kept = saved_arrays(ctx)
        # the saved inputs (kept here: the graph keeps only their nodes), their versions now, their
        # arrays (kept by the op anyway) and, for leaves, a checksum
        ctx.versions_at_forward = [(i, t, t._version, t.data, _checksum(t.data) if t.is_leaf else None)
                                   for i, t in enumerate(inputs)
                                   if isinstance(t, Tensor) and any(_same_memory(a, t.data) for a in kept)]
        if _finite(out.data):
            return
        causes = [f"{name} {_describe_input(t)} already held {_count(t.data)}"
                  for name, t in zip(input_names(ctx), inputs) if isinstance(t, Tensor) and not _finite(t.data)]
        cause = "; ".join(causes) if causes else ("every input was finite, so the op itself made it "
                                                   "(overflow, log or division by zero, inf - inf, ...)")
        raise AnomalyError(_report(ctx, f"the forward of {type(ctx).__name__} produced {_count(out.data)}", cause))

    def on_data_assigned(self, t: Tensor) -> None:
        self._assigned[id(t)] = (weakref.ref(t), user_line())

    def on_module(self, path: str, module, output) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        for i, o in enumerate(outputs):
            if isinstance(o, Tensor) and not _finite(o.data):  # no op of it made this, or on_forward would have raised
                where = f"output {i} of" if len(outputs) > 1 else "the output of"
                raise AnomalyError(f"detect_anomaly: {where} module {path or '(outermost)'} ({type(module).__name__}) "
                                   f"holds {_count(o.data)}, but none of its ops produced it: it was returned by a "
                                   f"forward hook ({_hook_names(module)}) or made outside the graph in its forward")

    def on_backward(self, node, grad_output, grad_inputs: tuple, seconds: float) -> None:
        ctx, name = node.ctx, type(node.ctx).__name__
        self._check_versions(ctx)
        if not _finite(grad_output):
            raise AnomalyError(_report(ctx, f"the gradient arriving at the output of {name} holds {_count(grad_output)}",
                                       "it was given to backward(), returned by a tensor hook, or overflowed when "
                                       "the gradients of its consumers were summed"))
        for input_name, t, g in zip(input_names(ctx), ctx.inputs, grad_inputs):
            if g is not None and not _finite(g):
                raise AnomalyError(_report(ctx, f"the backward of {name} returned {_count(g)} in the gradient for "
                                                f"{input_name} {_describe_input(t)}",
                                           "the gradient arriving at its output was finite, so its backward made it"))

    def _check_versions(self, ctx) -> None:
        """An AnomalyError if an input whose array the op saved was changed in place since its forward."""
        names = input_names(ctx)
        for i, t, version, array, checksum in getattr(ctx, "versions_at_forward", ()):
            if t.data is not array:  # a new array was assigned: the saved one is what the forward read
                continue
            changes = t._version - version
            if changes:
                ref, line = self._assigned.get(id(t), (None, None))
                where = f", last at {line}" if ref is not None and ref() is t and line else ""
                how = f".data assigned {changes} time{'s' * (changes > 1)} since{where}"
            elif checksum is not None and not _same_sum(checksum, _checksum(array)):
                how = (f"the sum of its values went from {checksum:.9g} to {_checksum(array):.9g}: its elements were "
                       "written, e.g. `w.data[0] = 1` or an optimizer step")
            else:
                continue
            raise AnomalyError(_report(ctx, f"{names[i]} {_describe_input(t)}, saved by the forward of "
                                            f"{type(ctx).__name__} for its backward, was changed in place before that "
                                            f"backward ran ({how})",
                                       "its backward used the changed values, so the gradients are not those of the "
                                       "forward that ran: change the tensor only after backward, or assign a new array"))


def _checksum(a) -> float:
    return float(a.sum(dtype=backend_of(a).float64).item()) if a.dtype.kind in "fc" else float(a.sum().item())


def _same_sum(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN == NaN here: a NaN sum that stayed NaN is no evidence of a change


def _same_memory(a, b) -> bool:
    """Whether arrays a and b are the same array or views of one (a write into b shows in a)."""
    return (a if getattr(a, "base", None) is None else a.base) is (b if getattr(b, "base", None) is None else b.base)


def _report(ctx, what: str, cause: str) -> str:
    origin = origin_of(ctx)
    path = origin.module if origin else getattr(ctx, "module_path", None)
    module = "(outside modules)" if path is None else path or "(outermost module)"
    lines = [f"detect_anomaly: {what}", f"  module:   {module}"]
    if origin is None:
        lines.append("  op line:  unknown: the forward ran before detect_anomaly was entered (run it inside to see it)")
    else:
        lines.append(f"  op line:  {origin.op_line}")
        if origin.user_line != origin.op_line:
            lines.append(f"  called from: {origin.user_line}")
    lines.append(f"  cause:    {cause}")
    return "\n".join(lines)


def _finite(a) -> bool:
    if a is None or a.dtype.kind not in "fc":
        return True
    return bool(backend_of(a).isfinite(a).all().item())


def _count(a) -> str:
    """"NaN (3 of 64 values)", "inf (1 of 64 values)" or "NaN and inf (...)"."""
    xp = backend_of(a)
    nan, inf = int(xp.isnan(a).sum().item()), int(xp.isinf(a).sum().item())
    kinds = " and ".join(k for k, n in (("NaN", nan), ("inf", inf)) if n)
    return f"{kinds} ({nan + inf} of {a.size} values)"


def _describe_input(t) -> str:
    """An input, a Tensor (in forward) or its GraphNode (in backward), as "(shape ..., made by ...)"."""
    if t is None:
        return ""
    ctx = t._ctx if isinstance(t, Tensor) else t.ctx
    if ctx is not None:
        op, origin = type(ctx).__name__, origin_of(ctx)
        if origin is None:
            return f"(shape {t.shape}, made by {op} before detect_anomaly was entered)"
        return f"(shape {t.shape}, made by {op} at {origin.user_line})"
    tensor = t if isinstance(t, Tensor) else t.tensor()
    name = tensor is not None and hooks.parameter_name(tensor)
    needs_grad = not isinstance(t, Tensor) or t.requires_grad  # a node exists only for a tensor that needs a gradient
    kind = f"parameter {name}" if name else "a tensor that requires grad" if needs_grad else "data, or made outside the graph"
    return f"(shape {t.shape}, a leaf: {kind})"


def _hook_names(module) -> str:
    fns = list(module._forward_hooks.values())
    return ", ".join(getattr(fn, "__qualname__", repr(fn)) for fn in fns) or "none registered"
