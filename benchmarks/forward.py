"""A forward pass under no_grad (prefill, evaluation): tinygpt next to transformers' GPT2LMHeadModel.

    python benchmarks/forward.py                          # B=1, T=128 and T=1024, 5 repeats
    python benchmarks/forward.py --tokens 128 --repeats 3 --profile
    python benchmarks/forward.py --baseline /tmp/old      # + tinygpt of another checkout

GPT-2 124M (qkv bias, tied head: transformers' GPT2Config(), use_cache=False), float32, random weights (each
engine its own; the work does not depend on the values), the same random token ids, logits
for every position. Each engine runs in its own process, started once per shape; the parent
asks them for one forward at a time, in turn, so that anything else the machine does falls on
all alike; each worker times its own call (wall clock). Every worker starts with the same C
allocator setting (--allocator, see allocator.py: by default freed memory stays in the
process). --profile then runs one more forward per engine with a per-op timer: tinygpt's
Function.apply timed per op class (forward only, so every op is one call), torch's profiler
on transformers' model (self CPU time per aten op).

Nothing here is run by the tests; results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import numpy as np

import allocator
from workers import Worker

ENGINES = ("tinygpt", "transformers")


def tinygpt_model():
    import tinygpt as tg
    from tinygpt.model import GPT_CONFIG_124M, GPTModel

    tg.manual_seed(0)
    return GPTModel({**GPT_CONFIG_124M, "qkv_bias": True, "tie_weights": True, "drop_rate": 0.0}).eval()


class Tinygpt:
    def __init__(self, ids: np.ndarray):
        import tinygpt as tg

        self.tg, self.model, self.ids = tg, tinygpt_model(), ids

    def forward(self):
        with self.tg.no_grad():
            return self.model(self.ids).data

    def profile(self) -> list[tuple[str, float, int]]:
        """(op, seconds, calls) of one forward, per op class, most time first."""
        from tinygpt.tensor import Function

        totals: dict[str, list] = {}
        plain_apply = Function.apply.__func__

        def timed(cls, *inputs, **options):
            start = time.perf_counter()
            out = plain_apply(cls, *inputs, **options)
            entry = totals.setdefault(cls.__name__, [0.0, 0])
            entry[0] += time.perf_counter() - start
            entry[1] += 1
            return out

        Function.apply = classmethod(timed)
        try:
            start = time.perf_counter()
            self.forward()
            total = time.perf_counter() - start
        finally:
            Function.apply = classmethod(plain_apply)
        rows = sorted(((name, s, n) for name, (s, n) in totals.items()), key=lambda r: -r[1])
        return rows + [("(outside ops: Python, modules)", total - sum(s for _, s, _ in rows), 0), ("total", total, 0)]


class Transformers:
    def __init__(self, ids: np.ndarray):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.torch, self.model = torch, GPT2LMHeadModel(GPT2Config()).eval()
        self.ids = torch.from_numpy(ids)

    def forward(self):
        with self.torch.no_grad():
            return self.model(self.ids, use_cache=False).logits  # as tinygpt's forward: no KV cache built

    def profile(self) -> list[tuple[str, float, int]]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            self.forward()
            total = time.perf_counter() - start
        rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
        rows.sort(key=lambda r: -r[1])
        return rows[:12] + [("total (wall, profiled)", total, 0)]


def worker(engine: str, settings: dict, conn) -> None:
    """Build the engine, then answer "run" -> seconds, "profile" -> rows, "finish" -> exit."""
    try:
        if engine == "baseline":
            for name in [m for m in sys.modules if m == "tinygpt" or m.startswith("tinygpt.")]:
                del sys.modules[name]
            sys.path.insert(0, settings["baseline"])
        ids = np.random.default_rng(0).integers(0, 50257, (settings["batch"], settings["tokens"]))
        runner = (Transformers if engine == "transformers" else Tinygpt)(ids)
        runner.forward()  # warm-up: first calls pay for allocation and caches
        conn.send(("ready", None))
        while (message := conn.recv()) != "finish":
            if message == "run":
                start = time.perf_counter()
                runner.forward()
                conn.send(("run", time.perf_counter() - start))
            else:
                conn.send(("profile", runner.profile()))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def measure(engines: list[str], settings: dict, repeats: int, profile: bool, pause: float) -> dict:
    workers = {e: Worker(e, worker, e, settings) for e in engines}
    for w in workers.values():
        w.receive()
    times = {e: [] for e in engines}
    for _ in range(repeats):
        for e, w in workers.items():
            times[e].append(w.ask("run"))
            time.sleep(pause)
    profiles = {e: w.ask("profile") for e, w in workers.items()} if profile else {}
    for w in workers.values():
        w.finish()
    return {"times": times, "profiles": profiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="128,1024", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between calls (BLAS threads spin down)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--baseline", metavar="DIR", help="also run the tinygpt package of this checkout")
    parser.add_argument("--profile", action="store_true", help="then one forward per engine with a per-op timer")
    parser.add_argument("--allocator", choices=allocator.MODES, default="keep",
                        help="keep: every worker keeps its freed memory (default; see benchmarks/allocator.py)")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if args.baseline:
        engines.append("baseline")
    print(f"forward under no_grad, GPT-2 124M (qkv bias, tied head), float32, batch {args.batch}, logits for every "
          f"position; median of {args.repeats}, engines alternating, each in its own process; {os.cpu_count()} CPUs; "
          + ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                                   "TINYGPT_NUM_THREADS")))
    print(allocator.set_for_workers(args.allocator))
    for tokens in [int(t) for t in args.tokens.split(",")]:
        settings = {"batch": args.batch, "tokens": tokens, "baseline": args.baseline and os.path.abspath(args.baseline)}
        result = measure(engines, settings, args.repeats, args.profile, args.pause)
        medians = {e: statistics.median(t) for e, t in result["times"].items()}
        print(f"\nT={tokens}:")
        for e, t in result["times"].items():
            ratio = f"  ({medians[e] / medians['transformers']:.2f}x transformers)" if "transformers" in medians else ""
            print(f"  {e:<13} median {medians[e] * 1000:8.1f} ms  (runs: {', '.join(f'{s * 1000:.0f}' for s in t)})"
                  + ratio)
        for e, rows in result["profiles"].items():
            print(f"  per op, {e} (ms, calls):")
            for name, seconds, calls in rows:
                print(f"    {name[:44]:<44} {seconds * 1000:9.2f}  {calls or ''}")


if __name__ == "__main__":
    main()
