"""Forward + backward of the GPT-2 124M shape on this machine: seconds and peak memory.

    python benchmarks/step_124m.py [--batch 2] [--tokens 256] [--repeats 3]

Peak memory is the process's maximum resident set size (ru_maxrss), which includes the
weights, their gradients and the activations kept for backward."""
import argparse
import resource
import statistics
import time

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.model import GPT_CONFIG_124M, GPTModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tg.manual_seed(0)
    model = GPTModel(GPT_CONFIG_124M)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50257, (args.batch, args.tokens + 1))
    times = []
    for i in range(args.repeats + 1):  # the first run warms up
        start = time.perf_counter()
        loss = F.cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        model.zero_grad()
        if i:
            times.append(time.perf_counter() - start)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"124M forward+backward, batch {args.batch} x {args.tokens}: median {statistics.median(times):.2f} s "
          f"over {args.repeats} runs (min {min(times):.2f}), loss {loss.item():.3f}, peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
