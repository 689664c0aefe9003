"""Long generation: the cost per token must not grow with the length of the output.

The default `tinygpt train` model shape (emb 128, 4 layers, 4 heads, context 128, a
character vocabulary of 100), random weights, batch 1, greedy, streamed through the same
StreamPrinter the `generate` command uses (into a discarded buffer). Every token past the
context costs one full window (the model's positions are absolute, so the KV cache cannot
slide); what must not happen is a cost that grows with what was generated before.

    python benchmarks/generate_long.py [--past 1000 5000 20000] [--device cpu]
"""
import argparse
import platform
import time

import numpy as np

import tinygpt as tg
from tinygpt.data import CharTokenizer
from tinygpt.generate import StreamPrinter, generate
from tinygpt.model import GPTModel

CONFIG = {"vocab_size": 100, "context_length": 128, "emb_dim": 128, "n_layers": 4, "n_heads": 4, "drop_rate": 0.0,
          "qkv_bias": False}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--past", type=int, nargs="+", default=[1000, 5000, 20000],
                        help="new tokens past the end of the context")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tg.set_default_device(args.device)
    tg.manual_seed(0)
    model = GPTModel(CONFIG).eval()
    tokenizer = CharTokenizer.from_text("".join(chr(32 + i) for i in range(95)) + "\n\t\u00e9\u00fc\u2014")
    prompt = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (1, 8))
    generate(model, prompt, 200, CONFIG["context_length"])  # warm-up
    print(f"default train model shape, batch 1, greedy, streamed; {platform.processor() or platform.machine()}, "
          f"NumPy {np.__version__}, device {args.device}")
    print(f"{'new tokens':>11} {'past context':>13} {'seconds':>9} {'ms/token':>9} {'ms/token, last 1000':>20}")
    for past in args.past:
        n = CONFIG["context_length"] - prompt.shape[1] + past
        stamps = []
        printer = StreamPrinter(tokenizer, write=lambda text: None)

        def on_token(column):
            printer(column)
            stamps.append(time.perf_counter())

        started = time.perf_counter()
        generate(model, prompt, n, CONFIG["context_length"], on_token=on_token)
        printer.finish()
        seconds = time.perf_counter() - started
        tail = (stamps[-1] - stamps[-1001]) / 1000 * 1e3
        print(f"{n:>11,} {past:>13,} {seconds:>9.2f} {seconds / n * 1e3:>9.3f} {tail:>20.3f}")


if __name__ == "__main__":
    main()
