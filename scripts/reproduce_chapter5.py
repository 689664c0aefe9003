"""Reproduce the book's chapter-5 pretraining run on "The Verdict".

The book trains a GPT-2 124M-shaped model (context 256) on the 5,145-token short story with
batch 2, stride 256, a 90/10 train/validation split, AdamW (lr 4e-4, weight decay 0.1) and
dropout 0.1 for 10 epochs, evaluating every 5 steps on 5 batches, and reports train loss
9.78 -> 0.39 and validation loss 9.93 -> 6.45. The RNG differs from PyTorch's, so expect the
same shape rather than the same digits: training loss under 1, validation loss under 7.

    python scripts/reproduce_chapter5.py --data ../shared/data/the-verdict.txt \
        --bpe-file ../shared/data/gpt2.tiktoken --out runs/chapter5
"""
import argparse
import json
import time
from pathlib import Path

import tinygpt as tg
from tinygpt.checkpoint import save_checkpoint
from tinygpt.data import create_dataloader, gpt2_tokenizer, train_val_split
from tinygpt.model import GPT_CONFIG_124M, GPTModel
from tinygpt.optim import AdamW
from tinygpt.train import plot_losses, train_model_simple


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/the-verdict.txt")
    parser.add_argument("--bpe-file", help="GPT-2 ranks file for offline use (or TINYGPT_BPE_FILE)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="runs/chapter5")
    args = parser.parse_args()

    tg.manual_seed(123)
    text = Path(args.data).read_text(encoding="utf-8")
    tokenizer = gpt2_tokenizer(args.bpe_file)
    model = GPTModel({**GPT_CONFIG_124M, "context_length": 256})
    train_text, val_text = train_val_split(text, 0.9)
    train_loader = create_dataloader(train_text, tokenizer, batch_size=2, max_length=256, stride=256,
                                     shuffle=True, drop_last=True, seed=123)
    val_loader = create_dataloader(val_text, tokenizer, batch_size=2, max_length=256, stride=256,
                                   shuffle=False, drop_last=False, seed=123)
    optimizer = AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

    start = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, num_epochs=args.epochs, eval_freq=5, eval_iter=5,
        start_context="Every effort moves you", tokenizer=tokenizer)
    minutes = (time.perf_counter() - start) / 60

    out = Path(args.out)
    save_checkpoint(out, len(train_loader) * args.epochs, model, tokenizer, optimizer)
    history = {"tokens_seen": tokens_seen, "train_loss": train_losses, "val_loss": val_losses, "step": list(range(len(train_losses)))}
    (out / "history.json").write_text(json.dumps(history, indent=1))
    plot_losses(history, out / "loss.png")
    print(f"train loss {train_losses[0]:.2f} -> {train_losses[-1]:.2f}; val loss {val_losses[0]:.2f} -> {val_losses[-1]:.2f} "
          f"(min {min(val_losses):.2f}); {tokens_seen[-1]:,} tokens seen; {minutes:.1f} min")
    print("book: train 9.78 -> 0.39, val 9.93 -> 6.45 (min about 6.13)")


if __name__ == "__main__":
    main()
