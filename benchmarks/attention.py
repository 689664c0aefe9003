"""Causal attention, forward + backward, at long contexts: tinygpt's tiled kernel, its untiled
plain op, and PyTorch (scaled_dot_product_attention, and the book's composition).

    python benchmarks/attention.py                                # T = 1024, 4096, B=1, 12 heads, D=64
    python benchmarks/attention.py --device cuda --json attention.json

Time: the median of --repeats calls of forward + backward (a GPU synchronised before the clock
stops). Memory: the most the call allocated beyond its inputs, from CuPy's pool and
torch.cuda.max_memory_allocated on a GPU, tracemalloc (NumPy's allocations) for tinygpt on the
CPU; torch's CPU allocations are not traced (shown as -). The untiled computations hold
B x H x T x T scores: 805 MB each at T = 4096.
Nothing here is run by the tests; results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc

import numpy as np


def tinygpt_call(mode: str, device: str, arrays):
    import tinygpt as tg
    import tinygpt.functional as F
    from tinygpt import backend

    def run():
        tg.set_kernels(mode)
        q, k, v = (tg.tensor(a, requires_grad=True, device=device) for a in arrays)
        F.scaled_dot_product_attention(q, k, v, causal=True).sum().backward()
        backend.to_host(q.grad.data[..., :1, :1])  # waits for a GPU
    return run


def torch_call(kind: str, device: str, arrays):
    import torch

    def run():
        q, k, v = (torch.tensor(a, device=device, requires_grad=True) for a in arrays)
        if kind == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the book's: matmul, masked_fill, softmax, matmul
            t = q.shape[-2]
            scores = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(t, t, dtype=torch.bool, device=device).triu(1),
                                                           -torch.inf)
            out = torch.softmax(scores / q.shape[-1] ** 0.5, dim=-1) @ v
        out.sum().backward()
        q.grad[..., :1, :1].cpu()
    return run


def peak_extra_bytes(run, engine: str, device: str) -> float | None:
    if device == "cpu":
        if engine.startswith("torch"):
            return None
        tracemalloc.start()
        run()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak
    if engine.startswith("torch"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - before
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    before = pool.total_bytes()
    run()
    return pool.total_bytes() - before  # the pool keeps what it took: its total is the peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    results = []
    for t in [int(x) for x in args.tokens.split(",")]:
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal((1, args.heads, t, args.head_dim)).astype(np.float32) for _ in range(3)]
        calls = {"tinygpt tiled": tinygpt_call("fast", args.device, arrays),
                 "tinygpt untiled": tinygpt_call("plain", args.device, arrays)}
        try:
            import torch  # noqa: F401

            calls |= {"torch sdpa": torch_call("sdpa", args.device, arrays), "torch book": torch_call("book", args.device, arrays)}
        except ImportError:
            pass
        for engine, run in calls.items():
            memory = peak_extra_bytes(run, engine, args.device)  # also the warm-up
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - start)
            results.append({"tokens": t, "engine": engine, "median_s": statistics.median(seconds), "peak_extra_bytes": memory})
            print(f"T={t:<5} {engine:<16} {statistics.median(seconds) * 1000:9.1f} ms  "
                  f"{'-' if memory is None else f'{memory / 2**20:8.1f} MiB'}", flush=True)
    if args.json:
        from tinygpt.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"command": " ".join(["python"] + sys.argv), "device": args.device,
                                                 "heads": args.heads, "head_dim": args.head_dim, "results": results},
                                                indent=2))


if __name__ == "__main__":
    main()
