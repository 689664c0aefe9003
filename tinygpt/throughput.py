"""How fast training runs: tokens per second and model FLOPs utilisation (MFU).

MFU, as nanoGPT and llm.c print it, is the share of the machine's matrix-product throughput
that the model's own arithmetic uses: (model FLOPs per token x tokens/s) / peak FLOP/s. The
peak here is measured, not taken from a datasheet: the best of a few runs of the product the
model's widest layer makes (tokens x C @ C x 4C) on the kernels the model uses, so 100 %
means "every step spends all its time in matrix products as fast as this machine does them".
What keeps MFU below that is everything else a step does: elementwise ops, Python, memory
traffic, waiting.

Model FLOPs per token, forward + backward (the PaLM paper's count, as nanoGPT's estimate_mfu):
    6 N                      N the weights of every Linear (the output head included): 2 N
                             FLOPs forward (a multiply and an add per weight), 4 N backward
  + 12 L H D T               attention's Q K^T and P V, 2 x 2 H D T per token and layer
                             forward, twice that backward (the full T x T, as if nothing
                             were masked: the convention, though causal kernels skip half)
Embeddings are lookups, norms and biases are not counted.
"""
from __future__ import annotations

import contextlib
import functools
import time

import numpy as np

from tinygpt import backend, kernels, nn

TIMING_COLUMNS = ("tokens_per_s", "mfu")  # history columns that are measurements: they differ from run to run


def without_timing(history: dict) -> dict:
    """The history's columns that a rerun reproduces exactly (all but TIMING_COLUMNS)."""
    return {key: column for key, column in history.items() if key not in TIMING_COLUMNS}


def flops_per_token(model, tokens: int) -> int:
    """Model FLOPs of one training token (forward + backward) at sequence length `tokens`."""
    weights = sum(m.weight.size for _, m in model.named_modules() if isinstance(m, nn.Linear))
    cfg = getattr(model, "cfg", {})
    attention = 0
    if "n_layers" in cfg and "n_heads" in cfg:
        head_dim = cfg.get("head_dim") or cfg["emb_dim"] // cfg["n_heads"]
        attention = 12 * cfg["n_layers"] * cfg["n_heads"] * head_dim * tokens
    return 6 * weights + attention


@functools.lru_cache(maxsize=8)
def peak_flops(device: str, dtype: str, rows: int, width: int, repeats: int = 3) -> float:
    """Best FLOP/s of the product [rows, width] @ [width, 4 width] on the kernels' matmul for
    `device` (the one Linear uses), best of `repeats` after one warm-up. Measured once per
    process and shape."""
    xp = backend.get_backend(device).xp
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((rows, width)).astype(dtype))
    b = xp.asarray(rng.standard_normal((width, 4 * width)).astype(dtype))
    matmul = kernels.module_of(device).matmul
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        backend.to_host(matmul(a, b)[:1, :1])  # the copy waits for a GPU to finish
        best = min(best, time.perf_counter() - start)
    return 2 * rows * width * 4 * width / best


class Speedometer:
    """Tokens per second of the training steps alone (evaluations, samples and checkpoints
    between them are not counted), and MFU, over the steps since the last `window()`."""

    def __init__(self, model, ranks: int = 1):
        self.model, self.ranks = model, ranks
        self.tokens, self.seconds = 0, 0.0
        self.peak: float | None = None
        self.flops_per_token = 0

    @contextlib.contextmanager
    def timing(self, batch):
        """Time the step run in the with-block, on `batch` (inputs [B, T], ...)."""
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start
        rows, tokens = batch[0].shape[0], batch[0].shape[-1]
        self.tokens += rows * tokens
        if self.peak is None:  # measured after the first step: the shapes are known, the kernels warm
            weight = self.model.parameters()[0]
            width = self.model.cfg["emb_dim"] if "emb_dim" in getattr(self.model, "cfg", {}) else 256
            # the whole job's peak: each rank runs its share of the rows on a machine like this one
            self.peak = self.ranks * peak_flops(weight.device, str(weight.dtype), max(1, rows // self.ranks) * tokens,
                                                width)
            self.flops_per_token = flops_per_token(self.model, tokens)

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def mfu(self) -> float:
        return self.rate() * self.flops_per_token / self.peak if self.peak else float("nan")

    def postfix(self) -> dict[str, str]:
        """For the progress bar."""
        return {"tok_s": f"{self.rate():.0f}", "mfu": f"{self.mfu():.0%}"}

    def window(self) -> dict[str, float | None]:
        """tokens_per_s and mfu of the steps since the last window (for the history); starts
        a new one."""
        values = {"tokens_per_s": round(self.rate(), 2) if self.seconds else None,
                  "mfu": round(self.mfu(), 4) if self.seconds and self.peak else None}
        self.tokens, self.seconds = 0, 0.0
        return values
