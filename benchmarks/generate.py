"""Generation speed: GPT-2 124M shape (random weights), batch 1, N new tokens, greedy,
tinygpt with and without the KV cache, next to Hugging Face transformers' generate on the
same shapes when it is installed. Several repeats, median tokens/s.

    python benchmarks/generate.py [--new-tokens 200] [--prompt-tokens 10] [--repeats 3]
"""
import argparse
import platform
import statistics
import time

import numpy as np

import tinygpt as tg
from tinygpt.generate import generate
from tinygpt.model import GPT_CONFIG_124M, GPTModel


def tokens_per_second(run, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tg.manual_seed(0)
    model = GPTModel({**GPT_CONFIG_124M, "qkv_bias": True, "tie_weights": True, "drop_rate": 0.0}).eval()
    prompt = np.random.default_rng(0).integers(0, 50257, (1, args.prompt_tokens))
    n = args.new_tokens
    generate(model, prompt, 5, 1024)  # warm-up: first calls pay for allocation and caches
    rows = [("tinygpt, KV cache", tokens_per_second(lambda: generate(model, prompt, n, 1024, use_cache=True), n, args.repeats)),
            ("tinygpt, no cache", tokens_per_second(lambda: generate(model, prompt, n, 1024, use_cache=False), n, args.repeats))]
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config()).eval()
        hf_prompt = torch.tensor(prompt)
        with torch.no_grad():
            hf.generate(hf_prompt, max_new_tokens=5, do_sample=False, pad_token_id=50256, attention_mask=torch.ones_like(hf_prompt))
        for cache in (True, False):
            def run(cache=cache):
                with torch.no_grad():
                    hf.generate(hf_prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=cache,
                                pad_token_id=50256, attention_mask=torch.ones_like(hf_prompt))
            rows.append((f"transformers {'KV cache' if cache else 'no cache'} (torch {torch.get_num_threads()} threads)",
                         tokens_per_second(run, n, args.repeats)))
    except ImportError:
        rows.append(("transformers", float("nan")))
    print(f"GPT-2 124M shape, batch 1, {args.prompt_tokens}-token prompt, {n} new tokens, greedy, median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, NumPy {np.__version__}")
    for name, rate in rows:
        print(f"  {name:<48} {rate:8.1f} tokens/s")


if __name__ == "__main__":
    main()
