"""Memory (and time) of one training step as the context grows: tinygpt next to PyTorch eager.

    python benchmarks/long_context.py                           # T = 256 ... 8192, batch 1, 124M
    python benchmarks/long_context.py --tokens 1024,4096 --steps 2 --memory-limit-gb 16

GPT-2 124M with context_length = T (position table included), batch 1, float32, dropout 0.1
(the training default), the step of benchmarks/train_step.py (forward, cross-entropy,
backward, AdamW, zero_grad) in the same worker processes: one fresh process per engine and
length, one engine at a time, so each peak is that engine's alone. Peak memory is the
worker's maximum resident set size. Every worker runs under an address-space limit
(--memory-limit-gb, default 18): an engine that needs more fails with an allocation error
instead of pushing a shared machine into its OOM killer, and is reported as "over the limit".

PyTorch eager here is the book's attention (benchmarks/torch_gpt.py: matmul, masked_fill,
softmax, dropout, matmul), which keeps [B, H, T, T] arrays per layer for backward.
Nothing here is run by the tests; results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import GB, Worker  # noqa: E402

from tinygpt.files import atomic_write_text  # noqa: E402
from tinygpt.model import GPT_PRESETS  # noqa: E402


def one_engine(engine: str, cfg: dict, settings: dict, steps: int) -> dict:
    """Peak memory and the last step's seconds of `steps` steps, or the error's last line."""
    worker = Worker(engine, cfg, settings)
    try:
        worker.receive("ready")
        seconds = [worker.ask("step", "step")[0] for _ in range(steps)]
        memory = worker.ask("finish", "memory")
        return {"seconds": seconds[-1], "peak_gb": memory["peak_bytes"] / GB}
    except RuntimeError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        return {"error": lines[-1][:160]}
    finally:
        worker.process.join(timeout=30)
        if worker.process.is_alive():
            worker.process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="256,1024,2048,4096,8192")
    parser.add_argument("--engines", default="tinygpt,torch")
    parser.add_argument("--steps", type=int, default=1, help="steps per engine and length (the last is timed)")
    parser.add_argument("--drop-rate", type=float, default=0.1)
    parser.add_argument("--memory-limit-gb", type=float, default=18.0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rows = []
    print(f"one training step, GPT-2 124M, batch 1, float32, dropout {args.drop_rate}, {args.steps} step(s) per "
          f"engine (the last timed), address space limited to {args.memory_limit_gb:g} GB per worker", flush=True)
    for tokens in [int(t) for t in args.tokens.split(",")]:
        cfg = {**GPT_PRESETS["gpt2-small"], "context_length": tokens, "drop_rate": args.drop_rate}
        settings = {"batch": 1, "tokens": tokens, "seed": 0, "device": "cpu", "dtype": "float32", "baseline": None,
                    "memory_limit_gb": args.memory_limit_gb}
        row = {"tokens": tokens}
        for engine in args.engines.split(","):
            row[engine] = one_engine(engine, cfg, settings, args.steps)
            r = row[engine]
            print(f"  T={tokens:<5} {engine:<8} " + (f"peak {r['peak_gb']:6.2f} GB, step {r['seconds']:7.2f} s"
                                                     if "error" not in r else f"failed: {r['error']}"), flush=True)
        if "peak_gb" in row.get("tinygpt", {}) and "peak_gb" in row.get("torch", {}):
            print(f"  T={tokens:<5} tinygpt / torch: memory {row['tinygpt']['peak_gb'] / row['torch']['peak_gb']:.2f}, "
                  f"time {row['tinygpt']['seconds'] / row['torch']['seconds']:.2f}", flush=True)
        rows.append(row)
    if args.json:
        atomic_write_text(args.json, json.dumps({"command": " ".join(["python"] + sys.argv),
                                                 "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
