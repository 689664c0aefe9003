"""Module hooks with PyTorch's semantics, and the module path of the op being run.

`Module.__call__` (nn.py) comes here when the call records a graph (so that each op knows
its module path: Function.apply notes it on the op) or when someone watches: a module has
hooks, or a trace / anomaly detector is in this thread's `graph_state.state.observers`.
Otherwise (under no_grad, unwatched: evaluation, generation) it calls forward directly, so
such a model pays one truth test per module call.

A full backward hook needs the gradients with respect to a module's inputs and outputs.
As in PyTorch, each tensor input (and output) is passed through an identity node; a tensor
hook on the identity's output sees the gradient arriving there. The module's hook is
called once the gradient of every input has arrived, and may replace them.
"""
from __future__ import annotations

import functools
import weakref

from tinygpt import backend
from tinygpt.graph_state import state
from tinygpt.tensor import Function, Tensor, is_grad_enabled
from tinygpt.tensor import HookHandle


def current_module() -> str | None:
    """The dotted path of the innermost module being called ("trf_blocks.3.att"), "" for the
    outermost module's own code, None outside any module. Known while the call records a graph
    or someone watches."""
    paths = state.module_paths
    return paths[-1] if paths else None


def parameter_name(t: Tensor) -> str | None:
    """The name of a parameter of the outermost module called last in this thread, if t is one."""
    if state.parameter_names is None:  # named when first asked (by a trace or an anomaly report), not every call
        root = state.outermost() if state.outermost is not None else None
        state.parameter_names = {} if root is None else {id(p): name for name, p in root.named_parameters()}
    return state.parameter_names.get(id(t))


def add_hook(hooks: dict, fn) -> HookHandle:
    handle = HookHandle(hooks)
    hooks[handle.id] = fn
    return handle


def call_module(module, args: tuple, kwargs: dict):
    """module.forward(*args, **kwargs) with its path pushed and its hooks run."""
    _enter(module)
    try:
        backward = _FullBackwardHook(module) if module._backward_hooks else None
        if backward is not None:
            args = backward.wrap_inputs(args)
        output = module.forward(*args, **kwargs)
        for fn in list(module._forward_hooks.values()):
            result = fn(module, args, output)
            if result is not None:
                output = _checked_output(fn, module, output, result)
        if backward is not None:
            output = backward.wrap_outputs(output)
        for observer in state.observers:
            if hasattr(observer, "on_module"):
                observer.on_module(state.module_paths[-1], module, output)
        return output
    finally:
        state.module_paths.pop()


def _enter(module) -> None:
    paths = state.module_paths
    if not paths:  # the outermost call names every module below it
        state.module_names = {id(m): name for name, m in module.named_modules()}
        state.outermost, state.parameter_names = weakref.ref(module), None
    path = state.module_names.get(id(module))
    if path is None:  # a module outside the outermost one's tree: name it by its class
        path = f"{paths[-1]}.{type(module).__name__}" if paths[-1] else type(module).__name__
    paths.append(path)


class HookIdentity(Function):
    """y = x, dL/dx = dL/dy: a node where a full backward hook can see a gradient."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class _FullBackwardHook:
    """One module call's hooks: collects dL/d(outputs), then dL/d(inputs), then calls them."""

    def __init__(self, module):
        self.module = module
        self.grad_inputs: list = []
        self.grad_outputs: list = []
        self.wrapped_inputs = self.wrapped_outputs = 0
        self.inputs_arrived = self.outputs_arrived = 0  # in the backward under way

    def wrap_inputs(self, args: tuple) -> tuple:
        """args with every tensor that requires grad passed through an identity node."""
        self.grad_inputs = [None] * len(args)
        if not is_grad_enabled():
            return args
        args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, Tensor) and a.requires_grad:
                args[i] = HookIdentity.apply(a)
                args[i].register_hook(functools.partial(self._input_arrived, i))
                self.wrapped_inputs += 1
        return tuple(args)

    def wrap_outputs(self, output):
        outputs = list(output) if isinstance(output, tuple) else [output]
        self.grad_outputs = [None] * len(outputs)
        for i, o in enumerate(outputs):
            if isinstance(o, Tensor) and o.requires_grad:
                outputs[i] = HookIdentity.apply(o)
                outputs[i].register_hook(functools.partial(self._output_arrived, i))
                self.wrapped_outputs += 1
        return tuple(outputs) if isinstance(output, tuple) else outputs[0]

    def _output_arrived(self, i: int, grad: Tensor) -> None:
        self.grad_outputs[i] = grad
        self.outputs_arrived += 1
        if self.outputs_arrived < self.wrapped_outputs:
            return
        self.outputs_arrived = 0
        if self.wrapped_inputs == 0:  # no input needs a gradient: PyTorch calls the hooks now, with None for each
            for fn in list(self.module._backward_hooks.values()):
                result = fn(self.module, tuple(self.grad_inputs), tuple(self.grad_outputs))
                if result is not None and any(r is not None for r in result):
                    raise RuntimeError(f"backward hook {_name(fn)} of {type(self.module).__name__} returned gradients, "
                                       "but no input of the module requires grad: return None")

    def _input_arrived(self, i: int, grad: Tensor):
        """The tensor hook of input i: when it is the last to arrive, run the module's hooks
        and return the (possibly replaced) gradient of input i."""
        self.grad_inputs[i] = grad
        self.inputs_arrived += 1
        if self.inputs_arrived < self.wrapped_inputs:
            return None
        self.inputs_arrived = 0
        arrived = list(self.grad_inputs)
        for fn in list(self.module._backward_hooks.values()):
            result = fn(self.module, tuple(self.grad_inputs), tuple(self.grad_outputs))
            if result is None:
                continue
            where = f"backward hook {_name(fn)} of {type(self.module).__name__}"
            if not isinstance(result, (tuple, list)) or len(result) != len(self.grad_inputs):
                got = f"{len(result)} gradients" if isinstance(result, (tuple, list)) else _described(result)
                raise RuntimeError(f"{where} returned {got}; return None or a tuple of one gradient (or None) "
                                   f"for each of its {len(self.grad_inputs)} inputs")
            self.grad_inputs = [self._replacement(fn, j, r) for j, r in enumerate(result)]
        for j, (before, after) in enumerate(zip(arrived, self.grad_inputs)):
            if j != i and after is not before:
                raise RuntimeError(f"backward hook of {type(self.module).__name__}: replacing the gradient of input {j} "
                                   "is possible only for the input whose gradient arrived last; this module has several "
                                   "inputs that require grad")
        return self.grad_inputs[i]

    def _replacement(self, fn, j: int, new):
        """Gradient j as the hook fn returned it: the same tensor, None, or a checked replacement."""
        old = self.grad_inputs[j]
        if new is None or new is old:
            return new
        if old is None:
            raise RuntimeError(f"backward hook {_name(fn)} of {type(self.module).__name__} returned a gradient for "
                               f"input {j}, which does not require grad: return None in its place")
        value = new.data if isinstance(new, Tensor) else new
        return Tensor(backend.hook_replacement(value, old.data, f"{_name(fn)} of {type(self.module).__name__}"))


def _checked_output(fn, module, output, result):
    """A forward hook's replacement output, of the output's kind: a Tensor for a Tensor, a tuple
    of as many for a tuple (anything else would fail later, far from the hook)."""
    if isinstance(output, Tensor):
        ok = isinstance(result, Tensor)
    elif isinstance(output, tuple):
        ok = isinstance(result, tuple) and len(result) == len(output)
    else:
        ok = True
    if not ok:
        raise TypeError(f"forward hook {_name(fn)} of {type(module).__name__} returned {_described(result)}; "
                        f"return None, or a replacement for the output ({_described(output)})")
    return result


def _described(value) -> str:
    if isinstance(value, Tensor):
        return f"a Tensor of shape {value.shape}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return f"a {type(value).__name__}"


def _name(fn) -> str:
    """The user's name for a hook: its qualified name, or its repr (a partial, a callable object)."""
    return getattr(fn, "__qualname__", None) or repr(fn)
