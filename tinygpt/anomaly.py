"""detect_anomaly(): stop at the first op whose forward makes an inf or NaN, or whose
backward returns one, and say where that op was created.

A NaN spreads: one bad weight makes a NaN activation, then a NaN loss, then NaN gradients
everywhere. Checking every op's result as it is made finds the first one, which is where
it was born, not where it surfaced. Every check costs a pass over the array, so this is for
hunting a bug, not for every run.

    with tg.detect_anomaly():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    RuntimeError: detect_anomaly: the forward of Linear in trf_blocks.1.att.W_key produced NaN ...
"""
from __future__ import annotations

from tinygpt import hooks
from tinygpt.backend import backend_of
from tinygpt.graph_state import state
from tinygpt.tensor import Tensor


class detect_anomaly:
    """Context manager: a RuntimeError at the first non-finite forward result or gradient,
    naming the op, its module path, its source lines and the input or gradient at fault."""

    def __enter__(self) -> "detect_anomaly":
        state.observers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        state.observers.remove(self)

    def on_forward(self, ctx, out: Tensor) -> None:
        from tinygpt.trace import label

        label(ctx)
        if _finite(out.data):
            return
        causes = [f"{name} {_describe_input(t)} already held {_count(t.data)}"
                  for name, t in zip(_names(ctx), ctx.inputs) if isinstance(t, Tensor) and not _finite(t.data)]
        cause = "; ".join(causes) if causes else ("every input was finite, so the op itself made it "
                                                   "(overflow, log or division by zero, inf - inf, ...)")
        raise RuntimeError(_report(ctx, f"the forward of {type(ctx).__name__} produced {_count(out.data)}", cause))

    def on_module(self, path: str, module, output) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        for i, o in enumerate(outputs):
            if isinstance(o, Tensor) and not _finite(o.data):  # no op of it made this, or on_forward would have raised
                where = f"output {i} of" if len(outputs) > 1 else "the output of"
                raise RuntimeError(f"detect_anomaly: {where} module {path or '(outermost)'} ({type(module).__name__}) "
                                   f"holds {_count(o.data)}, but none of its ops produced it: it was returned by a "
                                   f"forward hook ({_hook_names(module)}) or made outside the graph in its forward")

    def on_backward(self, node: Tensor, grad_output, grad_inputs: tuple, seconds: float) -> None:
        ctx, name = node._ctx, type(node._ctx).__name__
        if not _finite(grad_output):
            raise RuntimeError(_report(ctx, f"the gradient arriving at the output of {name} holds {_count(grad_output)}",
                                       "it was given to backward(), returned by a tensor hook, or overflowed when "
                                       "the gradients of its consumers were summed"))
        for input_name, t, g in zip(_names(ctx), ctx.inputs, grad_inputs):
            if g is not None and not _finite(g):
                raise RuntimeError(_report(ctx, f"the backward of {name} returned {_count(g)} in the gradient for "
                                                f"{input_name} {_describe_input(t)}",
                                           "the gradient arriving at its output was finite, so its backward made it"))


def _report(ctx, what: str, cause: str) -> str:
    from tinygpt.trace import label

    origin = label(ctx)
    module = "(outside modules)" if origin.module is None else origin.module or "(outermost module)"
    lines = [f"detect_anomaly: {what}", f"  module:   {module}", f"  op line:  {origin.op_line}"]
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
    if t is None:
        return ""
    if not t.is_leaf:
        return f"(shape {t.shape}, made by {type(t._ctx).__name__} before detect_anomaly was entered)"
    name = hooks.parameter_name(t)
    kind = f"parameter {name}" if name else "a tensor that requires grad" if t.requires_grad else "data, or made outside the graph"
    return f"(shape {t.shape}, a leaf: {kind})"


def _names(ctx) -> list[str]:
    from tinygpt.trace import input_names

    return input_names(ctx)


def _hook_names(module) -> str:
    fns = list(module._forward_hooks.values())
    return ", ".join(getattr(fn, "__qualname__", repr(fn)) for fn in fns) or "none registered"

