"""What watching the graph costs: a training step of a small GPT with the watch points of
trace() / detect_anomaly() / module hooks in place but nobody watching (as shipped), against
the same step with those code paths taken out, and, for scale, with detect_anomaly() and
trace() switched on.

    python benchmarks/anomaly_overhead.py                 # default model of `tinygpt train`, batch 8 x 128
    python benchmarks/anomaly_overhead.py --repeats 40 --json overhead.json

The watch points are: Function.apply's loop over `observers` after each op's forward, the
backward loop's timer and loop over `observers` (grads.call_backward), and Module.__call__'s
test for observers and hooks. "Taken out" replaces those three functions with copies that
lack these lines (below); the script checks that both give the same loss to the last bit.

The variants run in turn (out, in, out, in, ...) so that whatever else the machine does
falls on both alike; each figure is the median over the repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import grads, nn
from tinygpt.backend import backend_of, is_array
from tinygpt.files import atomic_write_text
from tinygpt.model import GPTModel
from tinygpt.optim import AdamW
from tinygpt.train_cli import DEFAULT_MODEL

TENSOR = sys.modules["tinygpt.tensor"]  # the module (the name tinygpt.tensor is the function tg.tensor)


# ============================================================================ the engine without watch points


@classmethod
def apply_unwatched(cls, *inputs, **options):
    """Function.apply with the observer loop deleted."""
    devices = {t.device for t in inputs if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"{cls.__name__}: expected all tensors on one device, got {' and '.join(sorted(devices))}")
    ctx = cls(inputs)
    data = cls.forward(ctx, *(None if t is None else t.data for t in inputs), **options)
    if not is_array(data):
        data = backend_of(next(t for t in inputs if t is not None).data).asarray(data)
    requires_grad = TENSOR._grad_enabled and any(ctx.needs_input_grad)
    return TENSOR.Tensor(data, requires_grad=requires_grad, _ctx=ctx if requires_grad else None)


def call_backward_unwatched(node, grad) -> tuple:
    """grads.call_backward with the timer and the observer loop deleted."""
    ctx = node._ctx
    result = ctx.backward(ctx, grad)
    if not isinstance(result, tuple):
        result = (result,)
    name = type(ctx).__name__
    if len(result) != len(ctx.inputs):
        raise RuntimeError(f"{name}.backward returned {len(result)} gradients for {len(ctx.inputs)} inputs")
    for i, (t, g) in enumerate(zip(ctx.inputs, result)):
        if t is not None and g is not None and t.requires_grad and is_array(g) and not grads.fits(g.shape, t.shape):
            raise RuntimeError(f"{name}.backward returned a gradient of shape {tuple(g.shape)} for input {i} of shape {t.shape}")
    return result


def module_call_unwatched(self, *args, **kwargs):
    return self.forward(*args, **kwargs)


SHIPPED = (TENSOR.Function.__dict__["apply"], TENSOR.call_backward, nn.Module.__call__)


def use(watch_points: bool) -> None:
    apply, call_backward, module_call = SHIPPED if watch_points else (apply_unwatched, call_backward_unwatched,
                                                                      module_call_unwatched)
    TENSOR.Function.apply = apply
    TENSOR.call_backward = call_backward
    nn.Module.__call__ = module_call


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
    ops = nodes = modules = 0

    def on_forward(self, ctx, out):
        self.ops += 1

    def on_backward(self, node, grad_output, grad_inputs, seconds):
        self.nodes += 1

    def on_module(self, path, module, output):
        self.modules += 1


class _Same(nn.Module):
    def forward(self, x):
        return x


def per_call_costs(rounds: int = 40, calls: int = 2000) -> dict:
    """Seconds per call of a one-element op's forward + backward, and of calling a module
    whose forward does nothing, with and without the watch points: the fastest round, as
    timeit does, since on a busy machine the slower rounds measure the other processes."""
    a, b = tg.tensor([1.0], requires_grad=True), tg.tensor([2.0])
    module = _Same()
    samples = {(w, what): [] for w in (False, True) for what in ("op", "module")}
    for _ in range(rounds):
        for watch_points in (False, True):
            use(watch_points)
            started = time.perf_counter()
            for _ in range(calls):
                (a * b).backward(np.ones(1, dtype=np.float32))
            samples[watch_points, "op"].append((time.perf_counter() - started) / calls)
            started = time.perf_counter()
            for _ in range(calls):
                module(a)
            samples[watch_points, "module"].append((time.perf_counter() - started) / calls)
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
    TENSOR.observers.append(counter)
    step(model, optimizer, x, y)
    TENSOR.observers.remove(counter)
    costs = per_call_costs()
    op_extra = costs[True, "op"] - costs[False, "op"]
    module_extra = costs[True, "module"] - costs[False, "module"]
    predicted = counter.ops * op_extra + counter.modules * module_extra  # every op here is also a backward node, or none
    print(f"per call (one-element tensors, fastest of 40 x 2000): op forward+backward {costs[False, 'op'] * 1e6:.2f} us "
          f"taken out, {costs[True, 'op'] * 1e6:.2f} us shipped ({op_extra * 1e9:+.0f} ns); module call "
          f"{costs[False, 'module'] * 1e9:.0f} ns vs {costs[True, 'module'] * 1e9:.0f} ns ({module_extra * 1e9:+.0f} ns)")
    print(f"one step runs {counter.ops} ops ({counter.nodes} backward nodes) and {counter.modules} module calls: "
          f"{predicted * 1e6:.0f} us of watch points, {predicted / base:.3%} of the step")
    if args.json:
        atomic_write_text(args.json, json.dumps({"batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
                                                 "variants": report, "ops": counter.ops, "modules": counter.modules,
                                                 "per_call_s": {f"{'shipped' if w else 'taken out'} {what}": v
                                                                for (w, what), v in costs.items()},
                                                 "predicted_fraction": predicted / base}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
