"""Generation speed: GPT-2 124M shape (random weights), batch 1, N new tokens, greedy,
tinygpt with and without the KV cache, next to Hugging Face transformers' generate on the
same shapes when it is installed. Several repeats, median tokens/s.

    python benchmarks/generate.py [--new-tokens 200] [--prompt-tokens 10] [--repeats 3] [--device cuda] [--json FILE]

On a GPU both engines run there and each run ends with its ids copied to the host, so the
clock stops only when the GPU's work is done.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

import tinygpt as tg
from tinygpt import backend
from tinygpt.files import atomic_write_text
from tinygpt.generate import generate
from tinygpt.model import GPT_CONFIG_124M, GPTModel


def tokens_per_second(run, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def tinygpt_rows(args, prompt: np.ndarray) -> list[tuple[str, float]]:
    tg.manual_seed(0)
    with backend.device_scope(args.device):
        model = GPTModel({**GPT_CONFIG_124M, "qkv_bias": True, "tie_weights": True, "drop_rate": 0.0}).eval()
    n = args.new_tokens

    def run(use_cache):
        return backend.to_host(generate(model, prompt, n, 1024, use_cache=use_cache))

    backend.to_host(generate(model, prompt, 5, 1024))  # warm-up: first calls pay for allocation, caches, GPU kernels
    return [("tinygpt, KV cache", tokens_per_second(lambda: run(True), n, args.repeats)),
            ("tinygpt, no cache", tokens_per_second(lambda: run(False), n, args.repeats))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    n = args.new_tokens
    prompt = np.random.default_rng(0).integers(0, 50257, (1, args.prompt_tokens))
    rows = tinygpt_rows(args, prompt)
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config()).eval().to(args.device)
        hf_prompt = torch.tensor(prompt, device=args.device)
        with torch.no_grad():
            hf.generate(hf_prompt, max_new_tokens=5, do_sample=False, pad_token_id=50256, attention_mask=torch.ones_like(hf_prompt))
        for cache in (True, False):
            def run(cache=cache):
                with torch.no_grad():
                    hf.generate(hf_prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=cache,
                                pad_token_id=50256, attention_mask=torch.ones_like(hf_prompt)).cpu()
            rows.append((f"transformers {'KV cache' if cache else 'no cache'} (torch {torch.get_num_threads()} threads)",
                         tokens_per_second(run, n, args.repeats)))
    except ImportError:
        rows.append(("transformers", float("nan")))
    print(f"GPT-2 124M shape, batch 1, {args.prompt_tokens}-token prompt, {n} new tokens, greedy, median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, NumPy {np.__version__}" + (", on cuda" if args.device == "cuda" else ""))
    for name, rate in rows:
        print(f"  {name:<48} {rate:8.1f} tokens/s")
    if args.json:
        report = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "device": args.device, "prompt_tokens": args.prompt_tokens, "new_tokens": n, "repeats": args.repeats,
                  "tokens_per_s": {name: (None if rate != rate else rate) for name, rate in rows}}  # NaN is not JSON
        atomic_write_text(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
