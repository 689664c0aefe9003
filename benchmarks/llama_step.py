"""The Llama family at the SmolLM2-135M shape: a training step and KV-cache decoding, tinygpt's
LlamaModel next to transformers' LlamaForCausalLM running the same architecture.

    python benchmarks/llama_step.py                       # B=4, T=256, float32: 2 rounds of 1 warm-up + 2 steps each
    python benchmarks/llama_step.py --steps 3 --decode 32
    python benchmarks/llama_step.py --preset llama-small --batch 2 --tokens 32 --steps 2   # a quick check

A step is forward, cross-entropy over the next tokens, backward, AdamW (lr 4e-4, weight
decay 0.1 on the matrices) and zero_grad; transformers' model is in train mode (attention:
its default, PyTorch's scaled_dot_product_attention). The weights are random (speed does not
depend on them), the tokens the same for both. Decoding: greedy, batch 1, a 16-token prompt,
--decode new tokens with the KV cache (tinygpt's generate; transformers' generate).

Every worker starts with the same C allocator setting (--allocator, default keep: glibc keeps
freed memory in the process; see benchmarks/allocator.py for why this machine needs it).
Each engine runs in its own process (`--worker NAME`), so each peak resident set size
(ru_maxrss, including the interpreter and imports, shown apart) is its own; the parent runs
them alternately (--rounds), and prints the medians. Results go to
benchmarks/RESULTS.md; nothing here is run by the tests.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

import allocator


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tokens(args, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, size=(args.batch, args.tokens + 1))


def run_tinygpt(args) -> dict:
    import tinygpt as tg
    import tinygpt.functional as F
    from tinygpt.generate import generate
    from tinygpt.llama import LLAMA_PRESETS, LlamaModel
    from tinygpt.optim import AdamW
    from tinygpt.train import decay_groups

    after_imports = peak_rss_mb()
    tg.manual_seed(0)
    model = LlamaModel({**LLAMA_PRESETS[args.preset], "context_length": max(args.tokens, 16 + args.decode)})
    ids = tokens(args, model.cfg["vocab_size"])
    optimizer = AdamW(decay_groups(model, 0.1), lr=4e-4, weight_decay=0.1)

    def step() -> float:
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    losses, times = timed(step, args.steps)
    prompt = ids[:1, :16]
    generate(model, prompt, 2, model.cfg["context_length"])  # warm-up
    start = time.perf_counter()
    generate(model, prompt, args.decode, model.cfg["context_length"])
    decode_rate = args.decode / (time.perf_counter() - start)
    return {"times": times, "losses": losses, "decode_tokens_per_s": decode_rate, "after_imports_mb": after_imports,
            "peak_mb": peak_rss_mb(), "parameters": model.num_parameters()}


def run_torch(args) -> dict:
    import torch
    import transformers

    from tinygpt.hf_llama import config_to_hf
    from tinygpt.llama import LLAMA_PRESETS, full_config

    after_imports = peak_rss_mb()
    torch.manual_seed(0)
    hf = config_to_hf(full_config({**LLAMA_PRESETS[args.preset], "context_length": max(args.tokens, 16 + args.decode)}))
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.from_numpy(tokens(args, config.vocab_size))
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed_tokens" not in n)]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=4e-4)

    def step() -> float:
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    losses, times = timed(step, args.steps)
    model.eval()
    prompt = ids[:1, :16]
    settings = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **settings)  # warm-up
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.decode, min_new_tokens=args.decode, **settings)
        decode_rate = args.decode / (time.perf_counter() - start)
    return {"times": times, "losses": losses, "decode_tokens_per_s": decode_rate, "after_imports_mb": after_imports,
            "peak_mb": peak_rss_mb(), "parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads()}


def timed(step, steps: int) -> tuple[list[float], list[float]]:
    losses, times = [step()], []  # the first step warms up
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return losses, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each engine, alternating")
    parser.add_argument("--worker", choices=["tinygpt", "torch"])
    parser.add_argument("--allocator", choices=allocator.MODES, default="keep",
                        help="keep: every worker keeps its freed memory (default; see benchmarks/allocator.py)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((run_tinygpt if args.worker == "tinygpt" else run_torch)(args)))
        return
    print(allocator.set_for_workers(args.allocator))
    runs = {"tinygpt": [], "torch": []}
    for _ in range(args.rounds):  # engines alternate, so a change in the machine's load falls on both
        for name in runs:
            command = [sys.executable, __file__, "--worker", name] + sys.argv[1:]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"the {name} worker failed:\n{done.stderr}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.preset}, batch {args.batch} x {args.tokens} tokens, float32, {args.rounds} rounds alternating, "
          f"each {args.steps} timed steps after 1 warm-up")
    summary = {}
    for name, rounds in runs.items():
        times = [t for r in rounds for t in r["times"]]
        decode = statistics.median(r["decode_tokens_per_s"] for r in rounds)
        peak = max(r["peak_mb"] for r in rounds)
        summary[name] = (statistics.median(times), peak, decode)
        r = rounds[0]
        print(f"  {name:<8} {r['parameters']:,} parameters; step median {summary[name][0]:.2f} s "
              f"(runs {', '.join(f'{t:.2f}' for t in times)}); losses {', '.join(f'{x:.3f}' for x in r['losses'])}; "
              f"peak RSS {peak:.0f} MB (after imports {r['after_imports_mb']:.0f}); decoding {decode:.1f} tokens/s")
    (ours, our_peak, our_rate), (theirs, their_peak, their_rate) = summary["tinygpt"], summary["torch"]
    print(f"tinygpt / transformers: step time {ours / theirs:.2f}, peak memory {our_peak / their_peak:.2f}, "
          f"decoding speed {our_rate / their_rate:.2f}")


if __name__ == "__main__":
    main()
