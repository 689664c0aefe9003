"""One full training step of a GPT, tinygpt next to PyTorch: time, memory, matmul efficiency.

    python benchmarks/train_step.py                               # GPT-2 124M shape, batch 4 x 256
    python benchmarks/train_step.py --batch 2 --repeats 3 --json step.json
    python benchmarks/train_step.py --emb-dim 64 --n-layers 2 --n-heads 4 --vocab-size 500 \\
        --batch 2 --tokens 32 --repeats 2 --drop-rate 0            # a quick check; losses must agree
    git worktree add /tmp/old HEAD~5
    python benchmarks/train_step.py --baseline /tmp/old            # + tinygpt of another checkout

A step is what a training loop does per batch: forward, cross-entropy, backward, AdamW
update, zero_grad. Both engines run the book's architecture (PyTorch: benchmarks/torch_gpt.py)
with the same initial weights, the same tokens, the same AdamW hyperparameters and dtype.

With --baseline DIR a third worker runs the tinygpt package found in DIR (another checkout,
e.g. a git worktree of an older commit) in the same rounds, so a change is measured against
the code before it and against PyTorch in one run, under the same conditions.

Each engine runs in its own worker process, so that each one's peak memory is its own and
neither inherits the other's heap, caches or threads. The parent asks the workers for one
step at a time, in turn (tinygpt, torch, tinygpt, torch, ...), so that anything else the
machine does during the run falls on both engines alike. Each worker times its own step:
wall-clock on the CPU, CUDA events on a GPU.

Peak memory is the worker's maximum resident set size on the CPU (so it includes the Python
interpreter and the imported libraries, shown apart as "after imports"), and on a GPU the
most memory the engine's allocator held (CuPy's memory pool, torch.cuda.max_memory_reserved).

Matmul efficiency sets the step's useful arithmetic against what this machine's BLAS (or
CuPy on a GPU) reaches on the model's own matrix shapes: an engine at 80% spends most of its
time in large matrix products, one at 30% loses most of it elsewhere.

Every worker starts with the same C allocator setting (--allocator; see allocator.py: by
default freed memory stays in the process, as in a loop that runs its steps back to back).
Thread settings are left as they are; set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS before the
run to change them. Nothing here is run by the tests; results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback

import numpy as np

import allocator
from workers import Worker
from tinygpt.model import GPT_PRESETS
from tinygpt.files import atomic_write_text

ENGINES = ("tinygpt", "torch", "torch-sdpa")  # torch-sdpa: the book's model with torch's fused attention
ADAMW = {"lr": 4e-4, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
GB = 1024**3


# ============================================================================ what both engines share


def initial_tinygpt_model(cfg: dict, seed: int, dtype: str, device: str):
    """tinygpt's GPTModel with its default initialisation from `seed`. The same seed gives the
    same weights on every device, so the torch worker copies them from a CPU build of this."""
    import tinygpt as tg
    from tinygpt.backend import device_scope
    from tinygpt.model import GPTModel

    tg.set_default_dtype(dtype)
    tg.manual_seed(seed)
    with device_scope(device):
        return GPTModel(cfg)


def token_batch(cfg: dict, batch: int, tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids: inputs [batch, tokens] and next-token targets [batch, tokens]."""
    ids = np.random.default_rng(seed).integers(0, cfg["vocab_size"], (batch, tokens + 1))
    return ids[:, :-1], ids[:, 1:]


def peak_rss_bytes() -> int:
    """This process's maximum resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def step_flops(cfg: dict, batch: int, tokens: int) -> int:
    """Floating-point operations of the step's matrix products.

    A weight matrix with n entries costs 2n FLOPs per token forward (a multiply and an add per
    entry) and 4n backward (the gradients for its input and for itself), so 6n per token. The
    Linear weights are 12 C^2 per block (query, key, value and output projections 4 C^2, the
    feed-forward 8 C^2) and C V for the output head; embeddings are lookups, and norms and
    biases are negligible. Attention adds Q K^T and P V, each 2 B T^2 C per layer forward and
    twice that backward. Both engines compute the full T x T scores (the causal mask
    does not skip the upper half), so the full T^2 is counted."""
    c, layers, n = cfg["emb_dim"], cfg["n_layers"], batch * tokens
    matmul_weights = layers * 12 * c * c + c * cfg["vocab_size"]
    attention = 3 * (2 * 2 * batch * layers * tokens**2 * c)
    return 6 * matmul_weights * n + attention


# ============================================================================ the two engines


class TinygptEngine:
    """tinygpt's GPTModel, cross_entropy and AdamW. Never imports torch."""

    def __init__(self, cfg: dict, settings: dict):
        import tinygpt.functional as F
        from tinygpt import backend
        from tinygpt.optim import AdamW

        self.rss_after_imports = peak_rss_bytes()
        self.device, self.F = settings["device"], F
        self.model = initial_tinygpt_model(cfg, settings["seed"], settings["dtype"], self.device)
        self.optimizer = AdamW(self.model.parameters(), **ADAMW)
        inputs, targets = token_batch(cfg, settings["batch"], settings["tokens"], settings["seed"])
        self.inputs, self.targets = backend.to_device(inputs, self.device), backend.to_device(targets, self.device)
        self.cupy = backend.get_backend("cuda").xp if self.device == "cuda" else None

    def about(self) -> dict:
        blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
        about = {"numpy": np.__version__, "blas": f"{blas.get('name', '?')} {blas.get('version', '')}".strip(),
                 "from": os.path.dirname(os.path.dirname(sys.modules["tinygpt"].__file__))}
        if self.cupy is not None:
            about["cupy"] = self.cupy.__version__
        return about

    def step(self):
        loss = self.F.cross_entropy(self.model(self.inputs), self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def timed_step(self) -> tuple[float, float]:
        """(seconds, loss) of one step."""
        if self.cupy is None:
            start = time.perf_counter()
            loss = self.step()
            return time.perf_counter() - start, loss.item()
        cuda = self.cupy.cuda
        cuda.Device().synchronize()
        start, end = cuda.Event(), cuda.Event()
        start.record()
        loss = self.step()
        end.record()
        end.synchronize()
        return cuda.get_elapsed_time(start, end) / 1000, loss.item()

    def peak_memory(self) -> dict:
        if self.cupy is None:
            return {"peak_bytes": peak_rss_bytes(), "rss_after_imports_bytes": self.rss_after_imports}
        # The pool keeps every block it ever got (nothing here frees them), so what it holds
        # at the end is the most it ever held.
        return {"peak_bytes": self.cupy.get_default_memory_pool().total_bytes()}


class TorchEngine:
    """The book's PyTorch GPT (benchmarks/torch_gpt.py) with torch's cross_entropy and AdamW."""

    def __init__(self, cfg: dict, settings: dict):
        import torch
        import torch_gpt

        self.rss_after_imports = peak_rss_bytes()
        self.torch, self.device = torch, settings["device"]
        dtype = {"float32": torch.float32, "float64": torch.float64}[settings["dtype"]]
        weights = {name: p.numpy() for name, p in
                   initial_tinygpt_model(cfg, settings["seed"], settings["dtype"], "cpu").state_dict().items()}
        self.model = torch_gpt.TorchGPTModel({**cfg, "torch_sdpa": settings.get("sdpa", False)}).to(dtype)
        torch_gpt.load_tinygpt_weights(self.model, weights)
        del weights
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), **ADAMW)
        inputs, targets = token_batch(cfg, settings["batch"], settings["tokens"], settings["seed"])
        self.inputs = torch.from_numpy(inputs).to(self.device)
        self.targets = torch.from_numpy(targets).reshape(-1).to(self.device)

    def about(self) -> dict:
        about = {"torch": self.torch.__version__, "torch_threads": self.torch.get_num_threads()}
        if self.device == "cuda":
            about["gpu"] = self.torch.cuda.get_device_name()
        return about

    def step(self):
        logits = self.model(self.inputs)
        loss = self.torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def timed_step(self) -> tuple[float, float]:
        if self.device != "cuda":
            start = time.perf_counter()
            loss = self.step()
            return time.perf_counter() - start, loss.item()
        cuda = self.torch.cuda
        cuda.synchronize()
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        start.record()
        loss = self.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, loss.item()

    def peak_memory(self) -> dict:
        if self.device != "cuda":
            return {"peak_bytes": peak_rss_bytes(), "rss_after_imports_bytes": self.rss_after_imports}
        cuda = self.torch.cuda
        return {"peak_bytes": cuda.max_memory_reserved(), "peak_allocated_bytes": cuda.max_memory_allocated()}


def worker(engine: str, cfg: dict, settings: dict, conn) -> None:
    """A worker process: build the engine, then answer the parent's messages:
    "step" -> (seconds, loss); "finish" -> peak memory, and exit."""
    try:
        if settings.get("memory_limit_gb"):  # an allocation past it fails in this worker instead of the machine's OOM killer
            limit = int(settings["memory_limit_gb"] * GB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if engine == "baseline":  # tinygpt from another checkout: forget the one this script imported
            for name in [m for m in sys.modules if m == "tinygpt" or m.startswith("tinygpt.")]:
                del sys.modules[name]
            sys.path.insert(0, settings["baseline"])
        runner = (TorchEngine if engine.startswith("torch") else TinygptEngine)(cfg, {**settings, "sdpa": engine == "torch-sdpa"})
        conn.send(("ready", runner.about()))
        while conn.recv() == "step":
            conn.send(("step", runner.timed_step()))
        conn.send(("memory", runner.peak_memory()))
    except Exception:
        conn.send(("error", traceback.format_exc()))


# ============================================================================ matmul throughput


def gemm_throughput(shapes: dict[str, tuple[int, int, int]], dtype: str, device: str, repeats: int = 3) -> dict:
    """Best GFLOP/s of (m, k) @ (k, n) for each named shape, and over all of them together
    (total FLOPs / total best time), on NumPy's BLAS or, on a GPU, CuPy. Small products are
    timed in runs of several calls, so that the clock's and the call's overheads do not count."""
    if device == "cuda":
        import cupy as xp

        synchronize = xp.cuda.Device().synchronize
    else:
        xp, synchronize = np, lambda: None

    def clock(run, calls: int = 1) -> float:
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        synchronize()
        return (time.perf_counter() - start) / calls

    rng = np.random.default_rng(0)
    results, total_flops, total_seconds = {}, 0, 0.0
    for name, (m, k, n) in shapes.items():
        a = xp.asarray(rng.standard_normal((m, k), dtype=np.float32).astype(dtype))
        b = xp.asarray(rng.standard_normal((k, n), dtype=np.float32).astype(dtype))
        out = xp.empty((m, n), dtype=dtype)

        def product():
            xp.matmul(a, b, out=out)

        calls = max(1, int(0.05 / clock(product)))  # the first call also warms up
        best = min(clock(product, calls) for _ in range(repeats))
        flops = 2 * m * k * n
        results[name] = {"shape": [m, k, n], "gflops": flops / best / 1e9}
        total_flops, total_seconds = total_flops + flops, total_seconds + best
    return {"shapes": results, "overall_gflops": total_flops / total_seconds / 1e9}


# ============================================================================ the run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(GPT_PRESETS), default="gpt2-small", help="GPT shape (default: 124M)")
    for name in ("emb-dim", "n-layers", "n-heads", "vocab-size", "context-length"):
        parser.add_argument(f"--{name}", type=int, help="override the preset's value")
    parser.add_argument("--drop-rate", type=float, help="override the preset's dropout (0.1); 0 makes the losses comparable")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per engine")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per engine first")
    parser.add_argument("--pause", type=float, default=0.2,
                        help="seconds between steps, so that one engine's idling BLAS threads, which spin for a "
                             "moment after their last call, do not take cores from the next (default 0.2)")
    parser.add_argument("--allocator", choices=allocator.MODES, default="keep",
                        help="keep: every worker keeps its freed memory (default; see benchmarks/allocator.py)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--engines", default="tinygpt,torch", help=f"comma-separated, from {','.join(ENGINES)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the tokens")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also step the tinygpt package of this checkout (e.g. a worktree of an older commit)")
    parser.add_argument("--memory-limit-gb", type=float,
                        help="address-space limit per worker (RLIMIT_AS): an engine that needs more fails alone")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        parser.error(f"--engines: unknown engine(s) {unknown or args.engines}; choose from {','.join(ENGINES)}")
    if args.baseline:
        if not os.path.isfile(os.path.join(args.baseline, "tinygpt", "__init__.py")):
            parser.error(f"--baseline {args.baseline}: no tinygpt package in that folder")
        args.baseline = os.path.abspath(args.baseline)
        args.engines.append("baseline")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.tokens < 1:
        parser.error(f"need --repeats >= 1, --warmup >= 0, --batch >= 1, --tokens >= 1; got {args.repeats}, "
                     f"{args.warmup}, {args.batch}, {args.tokens}")
    return args


def model_config(args: argparse.Namespace) -> dict:
    cfg = dict(GPT_PRESETS[args.preset])
    for key in ("emb_dim", "n_layers", "n_heads", "vocab_size", "context_length", "drop_rate"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.tokens > cfg["context_length"]:
        raise SystemExit(f"--tokens {args.tokens} is more than the context length {cfg['context_length']}")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise SystemExit(f"emb_dim {cfg['emb_dim']} is not divisible by n_heads {cfg['n_heads']}")
    return cfg


def run_rounds(workers: list[Worker], warmup: int, repeats: int, pause: float) -> tuple[dict, dict]:
    """Step each worker in turn, warmup + repeats rounds. Returns the timed seconds and every
    step's loss, per engine."""
    times = {w.engine: [] for w in workers}
    losses = {w.engine: [] for w in workers}
    for round_ in range(warmup + repeats):
        line = []
        for w in workers:
            seconds, loss = w.ask("step", "step")
            losses[w.engine].append(loss)
            if round_ >= warmup:
                times[w.engine].append(seconds)
            line.append(f"{w.engine} {seconds:.3f} s (loss {loss:.4f})")
            time.sleep(pause)
        label = "warm-up" if round_ < warmup else f"step {round_ - warmup + 1}/{repeats}"
        print(f"  {label}: " + ", ".join(line), flush=True)
    return times, losses


def print_header(cfg: dict, args: argparse.Namespace, about: dict) -> None:
    changed = {k: v for k, v in cfg.items() if v != GPT_PRESETS[args.preset][k]}
    shape = args.preset + (" with " + ", ".join(f"{k}={v}" for k, v in changed.items()) if changed else "")
    print(f"GPT {shape}: {cfg['n_layers']} layers, emb_dim {cfg['emb_dim']}, {cfg['n_heads']} heads, "
          f"vocab {cfg['vocab_size']}, drop_rate {cfg['drop_rate']}, qkv_bias {cfg['qkv_bias']}")
    print(f"step: batch {args.batch} x {args.tokens} tokens, {args.dtype}, {args.device}; forward + cross-entropy + "
          f"backward + AdamW(lr {ADAMW['lr']}, weight_decay {ADAMW['weight_decay']}) + zero_grad; "
          f"{args.warmup} warm-up + {args.repeats} timed steps per engine, alternating")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          + ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in THREAD_VARIABLES))
    for engine, info in about.items():
        print(f"  {engine}: " + ", ".join(f"{k} {v}" for k, v in info.items()))


def print_results(cfg: dict, args: argparse.Namespace, results: dict, ratios: dict, gemm: dict, flops: int) -> None:
    on_cpu = args.device == "cpu"
    print(f"\n{'engine':<8} {'median s/step (min, max)':>26} {'tokens/s':>9} "
          f"{'peak GB (after imports)' if on_cpu else 'peak GB (allocator)':>24} "
          f"{'first loss':>11} {'last loss':>10} {'GFLOP/s':>8} {'of gemm':>8}")
    for engine, r in results.items():
        spread = f"({r['min_s']:.3f}, {r['max_s']:.3f})"
        memory = f"{r['peak_bytes'] / GB:.2f}" + (f" ({r['rss_after_imports_bytes'] / GB:.2f})" if on_cpu else "")
        print(f"{engine:<8} {r['median_s']:>10.3f} {spread:>15} {r['tokens_per_s']:>9.1f} {memory:>24} "
              f"{r['first_loss']:>11.5f} {r['last_loss']:>10.5f} {r['gflops']:>8.1f} {r['gemm_fraction']:>8.0%}")
    if ratios:
        print(f"\ntinygpt / torch: step time {ratios['step_time']:.2f}, peak memory {ratios['peak_memory']:.2f}")
        if "baseline_step_time" in ratios:
            print(f"baseline / torch: step time {ratios['baseline_step_time']:.2f}, "
                  f"peak memory {ratios['baseline_peak_memory']:.2f}  (baseline: {args.baseline})")
        difference = ratios["first_loss_difference"]
        if cfg["drop_rate"] > 0:
            print(f"first-step losses differ by {difference:+.2e}: dropout is on ({cfg['drop_rate']}) and the engines "
                  "draw different masks; --drop-rate 0 makes them comparable")
        else:
            print(f"first-step losses differ by {difference:+.2e} (relative "
                  f"{abs(difference / results['torch']['first_loss']):.1e}); after the last step by "
                  f"{results['tinygpt']['last_loss'] - results['torch']['last_loss']:+.2e}")
    print(f"\nmatmul throughput ({'CuPy' if args.device == 'cuda' else 'NumPy'} {args.dtype}, best of 3), GFLOP/s: "
          + ", ".join(f"{name} [{m}x{k} @ {k}x{n}] {r['gflops']:.1f}"
                      for name, r in gemm["shapes"].items() for m, k, n in [r["shape"]])
          + f"; together {gemm['overall_gflops']:.1f}")
    print(f"step: {flops / 1e9:.1f} GFLOP in matrix products (see step_flops); 'of gemm' is an engine's GFLOP/s "
          "over the together figure")


def main() -> None:
    args = parse_args()
    cfg = model_config(args)
    settings = {k: getattr(args, k) for k in ("batch", "tokens", "seed", "device", "dtype", "baseline", "memory_limit_gb")}
    notes = []
    if "torch" in args.engines and importlib.util.find_spec("torch") is None:
        args.engines.remove("torch")
        notes.append("PyTorch is not installed: tinygpt alone")
        if not args.engines:
            raise SystemExit("PyTorch is not installed and it was the only engine asked for")

    # Workers start before this process allocates anything: on Linux a child's ru_maxrss
    # starts at its parent's peak at the time it was started.
    allocator_line = allocator.set_for_workers(args.allocator)
    workers = [Worker(engine, worker, engine, cfg, settings) for engine in args.engines]
    about = {w.engine: w.receive("ready") for w in workers}
    print_header(cfg, args, about)
    print(allocator_line)
    times, losses = run_rounds(workers, args.warmup, args.repeats, args.pause)
    memory = {w.engine: w.ask("finish", "memory") for w in workers}
    for w in workers:
        w.process.join()

    n, c = args.batch * args.tokens, cfg["emb_dim"]
    if args.device == "cuda" and importlib.util.find_spec("cupy") is None:
        gemm = {"shapes": {}, "overall_gflops": float("nan")}
        notes.append("CuPy is not installed: no matmul throughput to compare with")
    else:
        gemm = gemm_throughput({"x @ W_ff1 (C -> 4C)": (n, c, 4 * c), "x @ W_ff2 (4C -> C)": (n, 4 * c, c),
                                "x @ W_out (C -> V)": (n, c, cfg["vocab_size"])}, args.dtype, args.device)
    flops = step_flops(cfg, args.batch, args.tokens)
    results = {}
    for engine, seconds in times.items():
        median = statistics.median(seconds)
        results[engine] = {"seconds": seconds, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
                           "tokens_per_s": n / median, "first_loss": losses[engine][0], "last_loss": losses[engine][-1],
                           "gflops": flops / median / 1e9, "gemm_fraction": flops / median / 1e9 / gemm["overall_gflops"],
                           **memory[engine], "about": about[engine]}
    ratios = {}
    if "tinygpt" in results and "torch" in results:
        ours, theirs = results["tinygpt"], results["torch"]
        ratios = {"step_time": ours["median_s"] / theirs["median_s"], "peak_memory": ours["peak_bytes"] / theirs["peak_bytes"],
                  "first_loss_difference": ours["first_loss"] - theirs["first_loss"]}
        if "baseline" in results:
            ratios["baseline_step_time"] = results["baseline"]["median_s"] / theirs["median_s"]
            ratios["baseline_peak_memory"] = results["baseline"]["peak_bytes"] / theirs["peak_bytes"]
    print_results(cfg, args, results, ratios, gemm, flops)
    for note in notes:
        print(f"note: {note}")

    if args.json:
        report = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                              **{v: os.environ.get(v) for v in THREAD_VARIABLES}},
                  "config": cfg,
                  "settings": {**settings, "warmup": args.warmup, "repeats": args.repeats, "allocator": args.allocator},
                  "adamw": ADAMW, "step_flops": flops, "gemm": gemm, "engines": results, "tinygpt_over_torch": ratios,
                  "notes": notes}
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
