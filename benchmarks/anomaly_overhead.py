"""What watching the graph costs: a training step of a small GPT with the watch points of
trace() / detect_anomaly() / module hooks in place but nobody watching (as shipped), against
the same step with those code paths taken out, and, for scale, with detect_anomaly() and
trace() switched on.

    python benchmarks/anomaly_overhead.py                 # default model of `tinygpt train`, batch 8 x 128
    python benchmarks/anomaly_overhead.py --repeats 40 --json overhead.json

The watch points are: Function.apply's loop over this thread's observers after each op's
forward and its note of the module path on each op that records a graph (so that a trace of
a backward alone still names the modules), the backward loop's timer and loop over the
observers (grads.call_backward), Module.__call__'s way through hooks.call_module, which keeps
the module path, whenever the call records a graph, and the version counter of Tensor.data's
setter (anomaly mode compares it to find a saved tensor changed in place). "Taken out"
recompiles apply and call_backward from their own source without those lines (so the copies
cannot drift from the engine), calls forward directly in Module.__call__, and gives Tensor.data
a setter that counts nothing; the script checks that both give the same loss to the last bit.

The variants run in turn (out, in, out, in, ...) so that whatever else the machine does
falls on both alike; each figure is the median over the repeats.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import statistics
import sys
import textwrap
import time

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import nn
from tinygpt.files import atomic_write_text
from tinygpt.graph_state import watching
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW
from tinygpt.train_cli import DEFAULT_MODEL

TENSOR = sys.modules["tinygpt.tensor"]  # the module (the name tinygpt.tensor is the function tg.tensor)


# ============================================================================ the engine without watch points


class _TakeOut(ast.NodeTransformer):
    """Deletes the watch points from a function's syntax tree: loops over the observers, the
    note of the module path (`if ...: ctx.module_path = ...`) and the backward timer (`started = ...`)."""
    removed = 0

    def visit_If(self, node):
        if "module_path" in ast.unparse(node):
            self.removed += 1
            return None
        return self.generic_visit(node)

    def visit_For(self, node):
        if "observers" in ast.unparse(node.iter):
            self.removed += 1
            return None
        return self.generic_visit(node)

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Name) and t.id == "started" for t in node.targets):
            self.removed += 1
            return None
        return node


def without_watch_points(fn):
    """fn compiled again from its source, in its own module, without its watch points."""
    taker = _TakeOut()
    tree = taker.visit(ast.parse(textwrap.dedent(inspect.getsource(fn))))
    if not taker.removed:
        raise SystemExit(f"found no watch point in {fn.__qualname__}: this script no longer matches the engine")
    tree.body[0].decorator_list = []
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(tree), inspect.getsourcefile(fn), "exec"), fn.__globals__, namespace)
    return namespace[fn.__name__]


def module_call_unwatched(self, *args, **kwargs):
    return self.forward(*args, **kwargs)


def _set_data_uncounted(self, array) -> None:
    self._data = array


SHIPPED = (TENSOR.Function.__dict__["apply"], TENSOR.call_backward, nn.Module.__call__, TENSOR.Tensor.data)
TAKEN_OUT = (classmethod(without_watch_points(SHIPPED[0].__func__)), without_watch_points(SHIPPED[1]),
             module_call_unwatched, SHIPPED[3].setter(_set_data_uncounted))


def use(watch_points: bool) -> None:
    apply, call_backward, module_call, data = SHIPPED if watch_points else TAKEN_OUT
    TENSOR.Function.apply = apply
    TENSOR.call_backward = call_backward
    nn.Module.__call__ = module_call
    TENSOR.Tensor.data = data


# ============================================================================ the step


def setup(batch: int, tokens: int, seed: int = 123):
    tg.manual_seed(seed)
    cfg = {**DEFAULT_MODEL, "vocab_size": 96, "context_length": max(tokens, DEFAULT_MODEL["context_length"])}
    model = GPTModel(cfg)
    ids = np.random.default_rng(seed).integers(0, cfg["vocab_size"], (batch, tokens + 1))
    return model, AdamW(model.parameters(), lr=1e-4), ids[:, :-1], ids[:, 1:]


def step(model, optimizer, x, y, context=None) -> tuple[float, float]:
    """(seconds, loss) of forward, loss, backward, AdamW and zero_grad, inside `context`."""
    started = time.perf_counter()
    with context if context is not None else _Nothing():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started, loss.item()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# ============================================================================ per call, on tiny tensors


class _Counter:
    """Counts ops, backward nodes and module calls (an observer, so only for counting)."""
    ops = nodes = modules = assignments = 0

    def on_forward(self, ctx, out):
        self.ops += 1

    def on_backward(self, node, grad_output, grad_inputs, seconds):
        self.nodes += 1

    def on_module(self, path, module, output):
        self.modules += 1


def count_data_assignments(model, optimizer, x, y) -> int:
    """How many times one step assigns Tensor.data (each one counts a version)."""
    assigned = 0

    def counting(self, array) -> None:
        nonlocal assigned
        assigned += 1
        self._data = array

    TENSOR.Tensor.data = SHIPPED[3].setter(counting)
    try:
        step(model, optimizer, x, y)
    finally:
        use(True)
    return assigned


class _Same(nn.Module):
    def forward(self, x):
        return x


class _Chain(nn.Module):
    """Modules that do nothing, called in turn: one outermost call and CHAIN inner ones, as in a model."""
    CHAIN = 16

    def __init__(self):
        self.layers = nn.Sequential(*[_Same() for _ in range(self.CHAIN - 1)])

    def forward(self, x):
        return self.layers(x)


def per_call_costs(rounds: int = 40, calls: int = 2000) -> dict:
    """Seconds per call of a one-element op's forward + backward, of calling a module whose
    forward does nothing (on a tensor that requires grad; in a chain of such modules, so that
    the outermost call's naming of the modules below it counts once per chain, as in a
    model), and of assigning Tensor.data, with and without the watch points. The fastest round, as timeit does, since on a busy machine the
    slower rounds measure the other processes."""
    a, b = tg.tensor([1.0], requires_grad=True), tg.tensor([2.0])
    module, array = _Chain(), a.data
    samples = {(w, what): [] for w in (False, True) for what in ("op", "module", "data")}
    for _ in range(rounds):
        for watch_points in (False, True):
            use(watch_points)
            started = time.perf_counter()
            for _ in range(calls):
                (a * b).backward(np.ones(1, dtype=np.float32))
            samples[watch_points, "op"].append((time.perf_counter() - started) / calls)
            started = time.perf_counter()
            for _ in range(calls // module.CHAIN):
                module(a)
            samples[watch_points, "module"].append((time.perf_counter() - started) / (calls // module.CHAIN * (module.CHAIN + 1)))
            started = time.perf_counter()
            for _ in range(calls):
                b.data = array
            samples[watch_points, "data"].append((time.perf_counter() - started) / calls)
    use(True)
    return {key: min(values) for key, values in samples.items()}


def check_same_loss(batch: int, tokens: int) -> None:
    losses = []
    for watch_points in (False, True):
        use(watch_points)
        model, optimizer, x, y = setup(batch, tokens)
        losses.append([step(model, optimizer, x, y)[1] for _ in range(2)])
    if losses[0] != losses[1]:
        raise SystemExit(f"the engine without watch points computes other losses: {losses[0]} vs {losses[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=40, help="rounds of the per-call timings (default 40)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    check_same_loss(args.batch, 16)
    model, optimizer, x, y = setup(args.batch, args.tokens)
    variants = {"watch points taken out": (False, None), "as shipped, nobody watching": (True, None),
                "detect_anomaly() on": (True, tg.detect_anomaly), "trace() on": (True, tg.trace)}
    times = {name: [] for name in variants}
    for name, (watch_points, context) in variants.items():  # warm-up
        use(watch_points)
        step(model, optimizer, x, y, context and context())
    for _ in range(args.repeats):
        for name, (watch_points, context) in variants.items():
            use(watch_points)
            times[name].append(step(model, optimizer, x, y, context and context())[0])
    use(True)
    base = statistics.median(times["watch points taken out"])
    print(f"training step of the default `tinygpt train` model ({model.num_parameters():,} parameters), "
          f"batch {args.batch} x {args.tokens} tokens, median of {args.repeats}:")
    report = {}
    for name, values in times.items():
        median = statistics.median(values)
        low, high = np.percentile(values, [25, 75])
        report[name] = {"median_s": median, "q25_s": float(low), "q75_s": float(high), "vs_taken_out": median / base - 1}
        print(f"  {name:<30} {median * 1e3:8.1f} ms  (quartiles {low * 1e3:.1f}-{high * 1e3:.1f})  {median / base - 1:+7.1%}")
    counter = _Counter()
    with watching(counter):
        step(model, optimizer, x, y)
    counter.assignments = count_data_assignments(model, optimizer, x, y)
    costs = per_call_costs(args.rounds)
    op_extra = costs[True, "op"] - costs[False, "op"]
    module_extra = costs[True, "module"] - costs[False, "module"]
    data_extra = costs[True, "data"] - costs[False, "data"]
    # every op here is also a backward node, or none
    predicted = counter.ops * op_extra + counter.modules * module_extra + counter.assignments * data_extra
    print(f"per call (one-element tensors, fastest of {args.rounds} x 2000): op forward+backward "
          f"{costs[False, 'op'] * 1e6:.2f} us taken out, {costs[True, 'op'] * 1e6:.2f} us shipped "
          f"({op_extra * 1e9:+.0f} ns); module call {costs[False, 'module'] * 1e9:.0f} ns vs "
          f"{costs[True, 'module'] * 1e9:.0f} ns ({module_extra * 1e9:+.0f} ns); .data assignment "
          f"{costs[False, 'data'] * 1e9:.0f} ns vs {costs[True, 'data'] * 1e9:.0f} ns with the version count "
          f"({data_extra * 1e9:+.0f} ns)")
    print(f"one step runs {counter.ops} ops ({counter.nodes} backward nodes), {counter.modules} module calls and "
          f"{counter.assignments} .data assignments: {predicted * 1e6:.0f} us of watch points, "
          f"{predicted / base:.3%} of the step")
    if args.json:
        atomic_write_text(args.json, json.dumps({"batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
                                                 "variants": report, "ops": counter.ops, "modules": counter.modules,
                                                 "data_assignments": counter.assignments,
                                                 "per_call_s": {f"{'shipped' if w else 'taken out'} {what}": v
                                                                for (w, what), v in costs.items()},
                                                 "predicted_fraction": predicted / base}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
