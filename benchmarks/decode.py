"""Decoding speed with the KV cache at the GPT-2 124M shape: tokens per second of
generate(model, prompt, N, 1024), batch 1, greedy, random weights.

    python benchmarks/decode.py                        # 40 new tokens, median of 5 runs
    PYTHONPATH=/path/to/other/checkout python benchmarks/decode.py    # the same for other code

At batch 1 each new token is one row through every layer, so this measures the engine's
per-op overhead (Python, checks, dispatch) as much as its products. Nothing here is run by
the tests; results go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import tinygpt as tg
from tinygpt.generate import generate
from tinygpt.model import GPT_PRESETS, GPTModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tg.manual_seed(0)
    model = GPTModel({**GPT_PRESETS["gpt2-small"], "drop_rate": 0.0}).eval()
    prompt = np.arange(10).reshape(1, 10)
    generate(model, prompt, 5, 1024)  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate(model, prompt, args.new_tokens, 1024)
        rates.append(args.new_tokens / (time.perf_counter() - start))
    print(f"{tg.__file__}: KV-cache decoding, 124M shape, batch 1: median {statistics.median(rates):.1f} tokens/s "
          f"(runs: {', '.join(f'{r:.1f}' for r in rates)})")


if __name__ == "__main__":
    main()
