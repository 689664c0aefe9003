"""Attention alone: tinygpt's tiled kernel, its untiled plain op, and PyTorch (scaled_dot_product_attention,
and the book's composition), each engine in a worker process of its own, called in turn.

    python benchmarks/attention.py                                # causal fwd + bwd, B=1, T = 1024, 4096, 12 heads, D=64
    python benchmarks/attention.py --mode forward --tokens 128,1024 --engines tinygpt,torch   # under no_grad
    python benchmarks/attention.py --batch 4 --tokens 256 --dropout 0.1 --baseline /tmp/old  # + another checkout
    python benchmarks/attention.py --heads 9 --kv-heads 3 --batch 4 --tokens 256              # grouped-query
    python benchmarks/attention.py --device cuda --json attention.json

--mode step: forward + backward of sum(out * g); --mode forward: the forward under no_grad
(what prefill and evaluation run). Time: each worker times --calls calls back to back (a GPU
synchronised before the clock stops) and reports their mean: a call that follows an idle
moment runs up to 1.5x slower on this machine (the cores' clocks and caches), which a call
inside a model does not; the parent asks the engines in turn, --repeats rounds, and reports
the median. Memory (--mode step): the most one call allocated beyond its inputs, measured in a
call of its own before the timed ones: tracemalloc (NumPy's allocations) for tinygpt on the
CPU, CuPy's pool and torch.cuda.max_memory_allocated on a GPU; torch's CPU allocations are not
traced (shown as -). The untiled computations hold B x H x T x T scores: 805 MB each at
T = 4096, 12 heads. With --baseline DIR, "baseline" is the tiled kernel of the tinygpt
package in DIR (a git worktree of an older commit).
Nothing here is run by the tests; results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import tracemalloc

import numpy as np

from workers import Worker

ENGINES = ("tinygpt", "baseline", "tinygpt-untiled", "torch", "torch-book")


def arrays(settings: dict, t: int):
    """q [B, H, T, D], k and v [B, H_kv, T, D], float32, laid out as a model makes them ([B, T, H, D]
    in memory, the heads a transposed view), and the gradient of the output."""
    rng = np.random.default_rng(0)
    b, h, kv, d = settings["batch"], settings["heads"], settings["kv_heads"], settings["head_dim"]
    made = [rng.standard_normal((b, t, heads, d)).astype(np.float32).transpose(0, 2, 1, 3) for heads in (h, kv, kv, h)]
    return made[:3], made[3]


def tinygpt_call(engine: str, settings: dict, t: int):
    import tinygpt as tg
    import tinygpt.functional as F
    from tinygpt import backend

    (q0, k0, v0), g0 = arrays(settings, t)
    tg.set_kernels("plain" if engine == "tinygpt-untiled" else "fast")
    grad = settings["mode"] == "step"
    q, k, v = (tg.tensor(a, requires_grad=grad, device=settings["device"]) for a in (q0, k0, v0))
    g = tg.tensor(g0, device=settings["device"])
    p = settings["dropout"]

    def run():
        if grad:
            (F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=p) * g).sum().backward()
            backend.to_host(q.grad.data[..., :1, :1])  # waits for a GPU
            q.grad = k.grad = v.grad = None
        else:
            with tg.no_grad():
                backend.to_host(F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=p).data[..., :1, :1])
    return run


def torch_call(engine: str, settings: dict, t: int):
    import torch

    (q0, k0, v0), g0 = arrays(settings, t)
    grad, p, device = settings["mode"] == "step", settings["dropout"], settings["device"]
    q, k, v = (torch.tensor(a, device=device, requires_grad=grad) for a in (q0, k0, v0))
    g = torch.tensor(g0, device=device)

    def attention():
        if engine == "torch":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p,
                                                                    enable_gqa=k.shape[1] != q.shape[1])
        group = q.shape[1] // k.shape[1]  # the book's: matmul, masked_fill, softmax, dropout, matmul
        kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        future = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
        weights = torch.softmax((q @ kk.transpose(-1, -2)).masked_fill(future, -torch.inf) / q.shape[-1] ** 0.5, dim=-1)
        return torch.nn.functional.dropout(weights, p) @ vv

    def run():
        if grad:
            (attention() * g).sum().backward()
            q.grad[..., :1, :1].cpu()
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                attention()[..., :1, :1].cpu()
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


def worker(engine: str, settings: dict, t: int, conn) -> None:
    """Build the engine's call, measure its memory (also the warm-up), then answer "run" -> seconds."""
    try:
        if engine == "baseline":
            sys.path.insert(0, settings["baseline"])
        run = (torch_call if engine.startswith("torch") else tinygpt_call)(engine, settings, t)
        memory = peak_extra_bytes(run, engine, settings["device"]) if settings["mode"] == "step" else (run(), None)[1]
        conn.send(("ready", memory))
        while conn.recv() == "run":
            start = time.perf_counter()
            for _ in range(settings["calls"]):
                run()
            conn.send(("run", (time.perf_counter() - start) / settings["calls"]))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def measure(engines: list[str], settings: dict, t: int, repeats: int) -> list[dict]:
    workers, memory = {}, {}
    for engine in engines:  # one at a time, so that each memory figure is measured alone
        workers[engine] = Worker(engine, worker, engine, settings, t)
        memory[engine] = workers[engine].receive()
    seconds = {e: [] for e in engines}
    for _ in range(repeats):
        for engine, w in workers.items():
            seconds[engine].append(w.ask("run"))
    for w in workers.values():
        w.finish()
    return [{"tokens": t, "engine": e, "median_s": statistics.median(seconds[e]), "seconds": seconds[e],
             "peak_extra_bytes": memory[e]} for e in engines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("step", "forward"), default="step")
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention); default: --heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--calls", type=int, default=5, help="calls back to back per round")
    parser.add_argument("--engines", default="tinygpt,tinygpt-untiled,torch,torch-book", help=f"from {','.join(ENGINES)}")
    parser.add_argument("--baseline", metavar="DIR", help="also run the tiled kernel of the tinygpt package in DIR")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    engines = args.engines.split(",") + (["baseline"] if args.baseline else [])
    if unknown := set(engines) - set(ENGINES):
        parser.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    settings = {"mode": args.mode, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
                "head_dim": args.head_dim, "dropout": args.dropout, "device": args.device, "baseline": args.baseline,
                "calls": args.calls}
    print(f"attention {args.mode}: B={args.batch}, {args.heads} heads on {settings['kv_heads']} kv heads of "
          f"{args.head_dim}, causal, dropout {args.dropout}, float32, {args.device}; median of {args.repeats} rounds of "
          f"{args.calls} calls", flush=True)
    results = []
    for t in [int(x) for x in args.tokens.split(",")]:
        for r in measure(engines, settings, t, args.repeats):
            results.append(r)
            memory = r["peak_extra_bytes"]
            print(f"T={t:<5} {r['engine']:<16} {r['median_s'] * 1000:9.2f} ms  "
                  f"(min {min(r['seconds']) * 1000:.2f})  {'-' if memory is None else f'{memory / 2**20:8.1f} MiB'}",
                  flush=True)
    if args.json:
        from tinygpt.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"command": " ".join(["python"] + sys.argv), "settings": settings,
                                                 "results": results}, indent=2))


if __name__ == "__main__":
    main()
