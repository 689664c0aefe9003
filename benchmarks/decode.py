"""Cached decoding at batch 1 against its limit: tinygpt's generate, the gemv roofline, and
transformers' generate, measured side by side.

    python benchmarks/decode.py                                  # 200 new tokens, 5 rounds
    python benchmarks/decode.py --new-tokens 40 --rounds 3 --engines tinygpt,roofline
    python benchmarks/decode.py --baseline /tmp/old              # + tinygpt of another checkout
    python benchmarks/decode.py --device cuda --json decode.json # on a GPU (CuPy; torch there too)

GPT-2 124M shape (qkv bias, tied head, as transformers' GPT2Config()), random weights, a
10-token prompt, greedy, KV cache. At batch 1 a decoding step reads every weight once for one
row of products, so its limit is memory bandwidth: the roofline engine times one gemv per
weight matrix of the model (x @ W^T, the order and shapes a decoding step meets them, the
output head included), BLAS on its default threads and on one, and reports 1 / (the better
time) as tokens/s; a decoding step also does
attention, norms and Python, so ~90 % of it is the goal.

Each engine runs in its own process (the roofline in the tinygpt one, on the model's own
weight arrays), all started with the same C allocator setting (--allocator, default keep: see
benchmarks/allocator.py); rounds alternate the engines, so whatever else the machine does
falls on all alike. Reported: the median over rounds and the best round (closest to a quiet
machine).
Nothing here is run by the tests; results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

import allocator
from workers import Worker

ENGINES = ("tinygpt", "roofline", "transformers")  # roofline: the better of two runs, BLAS on 1 thread and on its default
CONFIG = {"qkv_bias": True, "tie_weights": True, "drop_rate": 0.0}


class Tinygpt:
    def __init__(self, settings: dict):
        import tinygpt as tg
        from tinygpt import backend, nn
        from tinygpt.generate import generate
        from tinygpt.model import GPT_CONFIG_124M, GPTModel

        tg.manual_seed(0)
        self.device, self.backend, self.generate = settings["device"], backend, generate
        with backend.device_scope(self.device):
            self.model = GPTModel({**GPT_CONFIG_124M, **CONFIG}).eval()
        self.weights = [m.weight.data for _, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        self.prompt = settings["prompt"]

    def run(self, new_tokens: int) -> float:
        """Seconds for new_tokens cached tokens (the prompt's forward excluded: timed alone first)."""
        start = time.perf_counter()
        self.backend.to_host(self.generate(self.model, self.prompt, 1, 1024))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        self.backend.to_host(self.generate(self.model, self.prompt, new_tokens + 1, 1024))
        return time.perf_counter() - start - prefill

    def roofline(self, new_tokens: int) -> float:
        """Seconds for new_tokens passes of one gemv per weight matrix: the better of BLAS on
        its default threads and on one (on a busy machine BLAS's spinning threads wait for each
        other; see kernels/threads.py)."""
        return min(self._gemvs(new_tokens, threads) for threads in (None, 1))

    def _gemvs(self, new_tokens: int, threads: int | None) -> float:
        from threadpoolctl import threadpool_limits

        xp = self.backend.get_backend(self.device).xp
        rows = {w.shape[1]: xp.ones((1, w.shape[1]), dtype=w.dtype) for w in self.weights}
        with threadpool_limits(threads, user_api="blas"):
            start = time.perf_counter()
            for _ in range(new_tokens):
                for w in self.weights:
                    out = rows[w.shape[1]] @ w.T
            self.backend.to_host(out[:, :1])
            return time.perf_counter() - start

    def about(self) -> dict:
        return {"weights_MB": sum(w.nbytes for w in self.weights) / 1e6, "from": os.path.dirname(sys.modules["tinygpt"].__path__[0])}


class Transformers:
    def __init__(self, settings: dict):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.torch, self.device = torch, settings["device"]
        self.model = GPT2LMHeadModel(GPT2Config()).eval().to(self.device)
        self.prompt = torch.tensor(settings["prompt"], device=self.device)

    def _generate(self, n: int):
        with self.torch.no_grad():
            return self.model.generate(self.prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                       pad_token_id=50256, attention_mask=self.torch.ones_like(self.prompt)).cpu()

    def run(self, new_tokens: int) -> float:
        start = time.perf_counter()
        self._generate(1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        self._generate(new_tokens + 1)
        return time.perf_counter() - start - prefill

    def about(self) -> dict:
        return {"torch": self.torch.__version__, "threads": self.torch.get_num_threads()}


def worker(engine: str, settings: dict, conn) -> None:
    try:
        if engine == "baseline":
            for name in [m for m in sys.modules if m == "tinygpt" or m.startswith("tinygpt.")]:
                del sys.modules[name]
            sys.path.insert(0, settings["baseline"])
        runner = (Transformers if engine == "transformers" else Tinygpt)(settings)
        runner.run(5)  # warm-up
        conn.send(("ready", runner.about()))
        while (message := conn.recv()) != "finish":
            kind, n = message
            conn.send(("seconds", getattr(runner, kind)(n)))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--baseline", metavar="DIR", help="also run the tinygpt package of this checkout")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--allocator", choices=allocator.MODES, default="keep",
                        help="keep: every worker keeps its freed memory (default; see benchmarks/allocator.py)")
    args = parser.parse_args()
    print(allocator.set_for_workers(args.allocator))
    engines = [e for e in args.engines.split(",") if e] + (["baseline"] if args.baseline else [])
    settings = {"device": args.device, "prompt": np.random.default_rng(0).integers(0, 50257, (1, 10)),
                "baseline": args.baseline and os.path.abspath(args.baseline)}
    workers = {e: Worker(e, worker, e, settings) for e in engines if e != "roofline"}
    about = {e: w.receive() for e, w in workers.items()}
    rates = {e: [] for e in engines}
    for round_ in range(args.rounds):
        for engine in engines:
            w = workers["tinygpt" if engine == "roofline" else engine]
            rates[engine].append(args.new_tokens / w.ask(("roofline" if engine == "roofline" else "run", args.new_tokens)))
            time.sleep(0.2)
        print(f"  round {round_ + 1}: " + ", ".join(f"{e} {r[-1]:.1f}" for e, r in rates.items()) + " tokens/s", flush=True)
    for w in workers.values():
        w.finish()
    medians = {e: statistics.median(r) for e, r in rates.items()}
    print(f"\ncached decoding, GPT-2 124M (qkv bias, tied head), batch 1, 10-token prompt, {args.new_tokens} new tokens, "
          f"greedy, {args.device}; {args.rounds} rounds alternating; {os.cpu_count()} CPUs")
    for engine, info in about.items():
        print(f"  {engine}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()))
    for engine, r in rates.items():
        line = f"  {engine:<13} median {medians[engine]:6.1f} tokens/s, best {max(r):6.1f}"
        if "roofline" in medians and engine != "roofline":
            line += f"; {medians[engine] / medians['roofline']:.0%} of the roofline (best rounds: {max(r) / max(rates['roofline']):.0%})"
        if "transformers" in medians and engine not in ("transformers", "roofline"):
            line += f"; {medians[engine] / medians['transformers']:.2f}x transformers"
        print(line)
    if args.json:
        from tinygpt.files import atomic_write_text

        report = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "about": about,
                  "new_tokens": args.new_tokens, "tokens_per_s": rates, "median_tokens_per_s": medians}
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
