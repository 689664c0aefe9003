"""Data parallel on one machine: 1 process x 2 threads against 2 MPI ranks x 1 thread.

    python benchmarks/ddp.py                                 # GPT-2 124M shape, global batch 4 x 128
    python benchmarks/ddp.py --rounds 3 --steps 3 --json benchmarks/ddp.json
    python benchmarks/ddp.py --emb-dim 64 --n-layers 2 --n-heads 4 --vocab-size 500 --steps 2 --rounds 1   # quick

Both runs do the same training step on the same global batch (forward, backward, gradient
sum over ranks, AdamW) with the same weights: the single process splits its work over two
threads (TINYGPT_NUM_THREADS=2), the two ranks split the batch (TINYGPT_NUM_THREADS=1 each).
Rounds alternate between the two so that whatever else the machine does falls on both; the
figures are medians over rounds of each round's median step. Reported per step: wall time,
tokens/s, the time the ranks spent in the gradient all-reduce (distributed.sum_gradients)
and the bytes each rank handed to it. Nothing here runs in the tests; results go to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker(args) -> None:
    """One run (1 process, or each of N ranks): warm-up step, then timed steps; rank 0 prints JSON."""
    import tinygpt as tg
    from tinygpt import distributed
    from tinygpt.model import GPT_PRESETS, GPTModel
    from tinygpt.optim import AdamW
    from tinygpt.train import calc_loss_batch

    distributed.init()
    cfg = {**GPT_PRESETS["gpt2-small"], "context_length": args.tokens, "drop_rate": 0.0}
    for key in ("emb_dim", "n_layers", "n_heads", "vocab_size"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    tg.manual_seed(0)
    model = GPTModel(cfg)
    params = list(model.parameters())
    optimizer = AdamW(params, lr=4e-4, weight_decay=0.1)
    distributed.start_training(params, {"cfg": cfg}, args.batch)
    rng = np.random.default_rng(0)
    reduce_seconds = []
    timed_sum = distributed.sum_gradients

    def sum_gradients(*a, **k):
        started = time.perf_counter()
        try:
            return timed_sum(*a, **k)
        finally:
            reduce_seconds.append(time.perf_counter() - started)

    distributed.sum_gradients = sum_gradients
    steps = []
    for step in range(args.steps + 1):
        x, y = (rng.integers(0, cfg["vocab_size"], (args.batch, args.tokens)) for _ in range(2))
        distributed.barrier()
        started = time.perf_counter()
        optimizer.zero_grad()
        distributed.forward_backward(lambda b: calc_loss_batch(*b, model), (x, y), params)
        optimizer.step()
        distributed.barrier()
        steps.append(time.perf_counter() - started)
    if distributed.is_main():
        grad_bytes = sum(p.data.nbytes for p in params)
        print(json.dumps({"ranks": distributed.world_size(), "step_s": statistics.median(steps[1:]),
                          "allreduce_s": statistics.median(reduce_seconds[1:]) if reduce_seconds else 0.0,
                          "bytes_reduced": grad_bytes if distributed.world_size() > 1 else 0,
                          "parameters": sum(p.data.size for p in params)}))


def run(ranks: int, args) -> dict:
    threads = 2 // ranks
    env = {**os.environ, "TINYGPT_NUM_THREADS": str(threads), **{v: "1" for v in THREADS}}
    command = [sys.executable, __file__, "--worker", *sys.argv[1:]]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        command = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(ranks), *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=4, help="global batch (rows)")
    p.add_argument("--tokens", type=int, default=128, help="context length")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--emb-dim", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    runs = {1: [], 2: []}
    for r in range(args.rounds):
        for ranks in (1, 2):
            runs[ranks].append(run(ranks, args))
            print(f"round {r + 1}, {ranks} rank(s): {runs[ranks][-1]}  load {os.getloadavg()[0]:.2f}", flush=True)
    tokens = args.batch * args.tokens
    summary = {}
    for ranks, results in runs.items():
        step = statistics.median(x["step_s"] for x in results)
        summary[ranks] = {"step_s": step, "tokens_per_s": tokens / step,
                          "allreduce_s": statistics.median(x["allreduce_s"] for x in results),
                          "bytes_reduced": results[0]["bytes_reduced"], "parameters": results[0]["parameters"]}
    one, two = summary[1], summary[2]
    print(f"\n{'':<26}{'step s':>9}{'tokens/s':>10}{'all-reduce s':>14}{'MB reduced':>12}")
    for name, s in (("1 process x 2 threads", one), ("2 ranks x 1 thread", two)):
        print(f"{name:<26}{s['step_s']:>9.2f}{s['tokens_per_s']:>10.1f}{s['allreduce_s']:>14.3f}"
              f"{s['bytes_reduced'] / 2**20:>12.1f}")
    print(f"2 ranks / 1 process: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x tokens/s; "
          f"all-reduce {two['allreduce_s'] / two['step_s']:.1%} of a 2-rank step")
    if args.json:
        from tinygpt.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"args": vars(args), "machine": platform.platform(),
                                                 "cpus": os.cpu_count(), "runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
