"""Forward and backward time of each fused op at GPT-2 124M shapes, tinygpt next to PyTorch.

    python benchmarks/ops.py                                   # B=4, T=256, C=768, 12 heads, V=50257
    python benchmarks/ops.py --ops attention,cross_entropy --repeats 20
    python benchmarks/ops.py --batch 2 --tokens 32 --repeats 2  # a quick check

The ops and their shapes, as one GPT-2 124M training step meets them:
    linear          x [B,T,C] @ W^T, W [4C,C], + b       (the feed-forward's first layer)
    layer_norm      [B,T,C]
    gelu            [B,T,4C]                             (tanh approximation, as GPT-2)
    softmax         attention scores [B,H,T,T], over the last axis
    attention       causal, q k v [B,H,T,D]; PyTorch twice: the book's composition
                    (matmul, masked_fill, softmax, matmul) and its fused scaled_dot_product_attention
    cross_entropy   logits [B*T,V] against integer targets
    embedding       ids [B,T] into a [V,C] table

Both engines get the same input arrays and the same output gradient, run one after the
other in this process, repeat after repeat, on the CPU, float32. Forward is timed with
gradients on (so it includes saving what backward needs); backward is timed as
`out.backward(grad)` from a fixed random `grad` of the output's shape (from the loss itself
for cross_entropy), including the write of each input's `.grad`. Times are medians over the
repeats, after warm-up repeats that are not counted. A short pause separates the calls
(--pause): NumPy's BLAS threads and PyTorch's keep spinning for a moment after a call, and on
a machine with few cores would otherwise slow the call that follows.

Thread settings are left as they are; set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS before the
run to change them. Nothing here is run by the tests; results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as tF

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.files import atomic_write_text

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class Op:
    """One op: its input arrays (the same for both engines, in the order the calls take them),
    which of them get gradients, the tinygpt call, and one or more PyTorch calls (label ->
    function) to set against it."""
    inputs: dict[str, np.ndarray]
    differentiable: tuple[str, ...]
    tinygpt: Callable
    torch: dict[str, Callable] = field(default_factory=dict)


def book_attention(mask: torch.Tensor) -> Callable:
    """The book's attention (chapter 3) on q, k, v [B,H,T,D], with its causal mask precomputed."""
    def attention(q, k, v):
        attn_scores = q @ k.transpose(2, 3)
        attn_scores.masked_fill_(mask, -torch.inf)
        attn_weights = torch.softmax(attn_scores / k.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ v
    return attention


def make_op(name: str, b: int, t: int, c: int, h: int, v: int, rng: np.random.Generator) -> Op:
    """The inputs and calls of op `name` at batch b, t tokens, c channels, h heads, vocabulary v."""
    def normal(*shape, std=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    if name == "linear":
        return Op({"x": normal(b, t, c), "weight": normal(4 * c, c, std=c**-0.5), "bias": normal(4 * c, std=0.1)},
                  ("x", "weight", "bias"), F.linear, {"F.linear": tF.linear})
    if name == "layer_norm":
        return Op({"x": normal(b, t, c), "scale": 1.0 + normal(c, std=0.1), "shift": normal(c, std=0.1)},
                  ("x", "scale", "shift"), F.layer_norm,
                  {"F.layer_norm": lambda x, scale, shift: tF.layer_norm(x, (c,), scale, shift, eps=1e-5)})
    if name == "gelu":
        return Op({"x": normal(b, t, 4 * c)}, ("x",), F.gelu,
                  {"F.gelu(approximate='tanh')": lambda x: tF.gelu(x, approximate="tanh")})
    if name == "softmax":
        return Op({"x": normal(b, h, t, t)}, ("x",), lambda x: F.softmax(x, axis=-1),
                  {"torch.softmax": lambda x: torch.softmax(x, dim=-1)})
    if name == "attention":
        d = c // h
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        return Op({"q": normal(b, h, t, d), "k": normal(b, h, t, d), "v": normal(b, h, t, d)}, ("q", "k", "v"),
                  lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
                  {"book: matmul, masked_fill, softmax, matmul": book_attention(mask),
                   "F.scaled_dot_product_attention": lambda q, k, v: tF.scaled_dot_product_attention(q, k, v, is_causal=True)})
    if name == "cross_entropy":
        return Op({"logits": normal(b * t, v), "targets": rng.integers(0, v, b * t)}, ("logits",), F.cross_entropy,
                  {"F.cross_entropy": tF.cross_entropy})
    if name == "embedding":
        return Op({"ids": rng.integers(0, v, (b, t)), "weight": normal(v, c)}, ("weight",),
                  lambda ids, weight: F.embedding(ids, weight), {"F.embedding": tF.embedding})
    raise ValueError(f"unknown op {name!r}; choose from {', '.join(OPS)}")


OPS = ("linear", "layer_norm", "gelu", "softmax", "attention", "cross_entropy", "embedding")


# ============================================================================ timing


@dataclass
class Runner:
    """One engine's call of an op, with its own copies of the inputs and the output gradient."""
    label: str
    forward: Callable
    inputs: list  # passed by position: the two libraries name their arguments differently
    leaves: list
    grad: object  # the output gradient, or None when the output is the loss itself
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)

    def run(self, record: bool) -> None:
        for leaf in self.leaves:
            leaf.grad = None
        start = time.perf_counter()
        out = self.forward(*self.inputs)
        middle = time.perf_counter()
        out.backward(self.grad)
        end = time.perf_counter()
        if record:
            self.forward_s.append(middle - start)
            self.backward_s.append(end - middle)


def runners(op: Op, rng: np.random.Generator) -> list[Runner]:
    """tinygpt's runner first, then one per PyTorch call, all with the same inputs and output gradient."""
    tinygpt_inputs = {k: tg.tensor(a, requires_grad=k in op.differentiable) for k, a in op.inputs.items()}
    torch_inputs = {k: torch.from_numpy(a.copy()).requires_grad_(k in op.differentiable) for k, a in op.inputs.items()}
    with tg.no_grad():
        out_shape = op.tinygpt(*tinygpt_inputs.values()).shape
    grad = rng.standard_normal(out_shape, dtype=np.float32) if math.prod(out_shape) > 1 else None
    found = [Runner("tinygpt", op.tinygpt, list(tinygpt_inputs.values()),
                     [tinygpt_inputs[k] for k in op.differentiable], grad)]
    for label, forward in op.torch.items():
        found.append(Runner(label, forward, list(torch_inputs.values()), [torch_inputs[k] for k in op.differentiable],
                            None if grad is None else torch.from_numpy(grad)))
    return found


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


# ============================================================================ the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--emb-dim", type=int, default=768)
    parser.add_argument("--n-heads", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per op and engine")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument("--pause", type=float, default=0.05,
                        help="seconds between calls, so that one library's idling threads, which spin for a moment "
                             "after their last call, do not take cores from the other's (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown or not names:
        parser.error(f"--ops: unknown op(s) {unknown or names}; choose from {','.join(OPS)}")
    if args.emb_dim % args.n_heads:
        parser.error(f"--emb-dim {args.emb_dim} is not divisible by --n-heads {args.n_heads}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")

    b, t, c, h, v = args.batch, args.tokens, args.emb_dim, args.n_heads, args.vocab_size
    blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
    print(f"ops at B={b}, T={t}, C={c}, H={h}, V={v}, float32, CPU; median of {args.repeats} after {args.warmup} warm-up")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, NumPy "
          f"{np.__version__} ({blas.get('name', '?')}), torch {torch.__version__} ({torch.get_num_threads()} threads); "
          + ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in THREAD_VARIABLES))

    tg.set_default_dtype(np.float32)
    rng = np.random.default_rng(args.seed)
    print(f"\n{'op':<14} {'tinygpt fwd':>11} {'bwd ms':>8}   {'torch fwd':>9} {'bwd ms':>8}   "
          f"{'tinygpt/torch fwd':>17} {'bwd':>5} {'both':>5}   torch call")
    results = []
    for name in names:
        op_runners = runners(make_op(name, b, t, c, h, v, rng), rng)
        for repeat in range(args.warmup + args.repeats):
            for runner in op_runners:
                runner.run(record=repeat >= args.warmup)
                time.sleep(args.pause)
        ours = op_runners[0]
        ours_fwd, ours_bwd = median_ms(ours.forward_s), median_ms(ours.backward_s)
        for peer in op_runners[1:]:
            fwd, bwd = median_ms(peer.forward_s), median_ms(peer.backward_s)
            row = {"op": name, "torch_call": peer.label, "tinygpt_forward_ms": ours_fwd, "tinygpt_backward_ms": ours_bwd,
                   "torch_forward_ms": fwd, "torch_backward_ms": bwd, "forward_ratio": ours_fwd / fwd,
                   "backward_ratio": ours_bwd / bwd, "total_ratio": (ours_fwd + ours_bwd) / (fwd + bwd)}
            results.append(row)
            print(f"{name:<14} {ours_fwd:>11.2f} {ours_bwd:>8.2f}   {fwd:>9.2f} {bwd:>8.2f}   "
                  f"{row['forward_ratio']:>17.2f} {row['backward_ratio']:>5.2f} {row['total_ratio']:>5.2f}   {peer.label}",
                  flush=True)
        del op_runners

    if args.json:
        report = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "shapes": {"batch": b, "tokens": t, "emb_dim": c, "n_heads": h, "vocab_size": v},
                  "repeats": args.repeats, "warmup": args.warmup,
                  "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "numpy": np.__version__,
                              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                              **{name: os.environ.get(name) for name in THREAD_VARIABLES}},
                  "ops": results}
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
