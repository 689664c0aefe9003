"""A walk through backprop in a real GPT, on a CPU, in about ten seconds:

  1. trace one transformer block's backward pass, node by node, with real numbers;
  2. plant a NaN in one weight and let detect_anomaly() find where it was born;
  3. write the layer_norm backward yourself, wrongly and then rightly, and have it checked.

    python scripts/backprop_tour.py            # exercise files go to a temporary folder
    python scripts/backprop_tour.py --dir ex   # or to ex/, to open and edit afterwards

The README's section "Watching backprop" shows what it prints.
"""
from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import numpy as np

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import exercises
from tinygpt.data import CharTokenizer
from tinygpt.model import GPTModel
from tinygpt.data import default_corpus

CFG = {"vocab_size": None, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": False}


def heading(text: str) -> None:
    print(f"\n{'=' * 8} {text} {'=' * (80 - len(text))}\n")


def small_gpt_and_batch():
    """A 2-block GPT on the characters of the text that ships with Python, and one batch."""
    text = default_corpus()
    tokenizer = CharTokenizer.from_text(text)
    tg.manual_seed(123)
    model = GPTModel({**CFG, "vocab_size": tokenizer.n_vocab})
    ids = np.asarray(tokenizer.encode(text[:2 * 16 + 1]))
    return model, ids[:-1].reshape(2, 16), ids[1:].reshape(2, 16)


def trace_one_block() -> None:
    heading("1. one block's backward, node by node")
    model, x, y = small_gpt_and_batch()
    with tg.trace() as t:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    print(f"loss {loss.item():.4f}; {len(t.nodes)} backward nodes in the whole model. Block 0, in the order they ran:\n")
    print(t.table(flat=True, module="trf_blocks.0"))
    block = [n for n in t.nodes if n.module is not None and n.module.startswith("trf_blocks.0")]
    shortcut, ff_out = block[0], block[1]
    print(f"\nRead it bottom-up as the forward, top-down as backward. Node {shortcut.index} is the second shortcut "
          f"x + ff(norm2(x)): an Add passes its gradient to both inputs unchanged, so the Linear under it "
          f"(node {ff_out.index}) receives the same |grad| {ff_out.grad_norm:.4e}.")
    attention = next(n for n in block if n.op == "ScaledDotProductAttention")
    queries = next(n for n in block if n.module == "trf_blocks.0.att.W_query")
    print(f"Attention (node {attention.index}) keeps q, k, v and the weights for its backward "
          f"({attention.saved_bytes:,} bytes). The queries' gradient ({queries.grad_norm:.2e}) is far smaller than "
          f"the values' because at initialisation the weights are nearly uniform, so moving a score changes little (entropies below).")
    stats = t.modules["trf_blocks.0.att"]
    print("Attention entropy per head (nats; uniform over 16 keys would average "
          f"{np.mean(np.log(np.arange(1, 17))):.2f}): " + " ".join(f"{e:.2f}" for e in stats.attention_entropy))


def find_a_nan() -> None:
    heading("2. a NaN planted in block 1's key weights")
    model, x, y = small_gpt_and_batch()
    model.trf_blocks[1].att.W_key.weight.data[7, 3] = np.nan
    loss = F.cross_entropy(model(x), y)
    print(f"Without anomaly mode the loss is just {loss.item()}, and so is every gradient after backward.\n")
    try:
        with tg.detect_anomaly():
            F.cross_entropy(model(x), y)
    except RuntimeError as e:
        print(e)


WRONG = """    dxhat = dy * scale
    dx = dxhat * rstd                            # forgets that x_j also moves mean and rstd
    dscale = (dy * xhat).sum(axis=(0, 1))
    dshift = dy.sum(axis=(0, 1))
    return dx, dscale, dshift
"""

RIGHT = """    dxhat = dy * scale
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    dscale = (dy * xhat).sum(axis=(0, 1))
    dshift = dy.sum(axis=(0, 1))
    return dx, dscale, dshift
"""


def layer_norm_exercise(directory: Path) -> None:
    heading("3. the layer_norm exercise")
    path = exercises.start("layer_norm", directory, force=True)
    stub = path.read_text()
    print(f"`tinygpt exercise start layer_norm` wrote {path}; its backward is a stub.\n")
    for label, body in (("a first try, forgetting the paths through mean and rstd", WRONG), ("the derivation's answer", RIGHT)):
        path.write_text(re.sub(r"    raise NotImplementedError\(.*\)\n", lambda _: body, stub))
        print(f"--- {label}:\n{body}")
        print(exercises.run_check("layer_norm", path).report())
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description="a walk through backprop in a real GPT")
    parser.add_argument("--dir", type=Path, help="where to write the exercise file (default: a temporary folder)")
    args = parser.parse_args()
    trace_one_block()
    find_a_nan()
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        layer_norm_exercise(args.dir)
    else:
        with tempfile.TemporaryDirectory() as directory:
            layer_norm_exercise(Path(directory))


if __name__ == "__main__":
    main()
