"""`tinygpt trace`: the default run, flat output and files, a trained checkpoint, and mistakes
in the command as one line with exit status 2."""
import json
import re

import pytest

from tinygpt.cli import main

# The default model (4 blocks) has per block: 2 shortcut Adds, Linear-GELU-Linear, 2 LayerNorms,
# 3 projections + out_proj, and 4 Reshapes + 4 Transposes + attention = 20 nodes; outside the
# blocks: tok_emb, pos_emb, their Add, final_norm, out_head and the loss = 6.
DEFAULT_NODES = 4 * 20 + 6


def test_trace_with_no_options_prints_every_module_of_the_default_model(capsys):
    assert main(["trace"]) == 0
    out = capsys.readouterr().out
    assert "the default model of `tinygpt train`" in out and "batch 2 x 64 tokens" in out
    assert f"{DEFAULT_NODES} backward nodes" in out
    rows = {line.split()[0] for line in out.splitlines() if line[:1].isalpha() or line.startswith("(")}
    for block in range(4):
        assert {f"trf_blocks.{block}.att", f"trf_blocks.{block}.att.W_query", f"trf_blocks.{block}.ff.layers.1"} <= rows
    loss = float(re.search(r"loss (\d+\.\d+)", out).group(1))
    assert 3.5 < loss < 6.5  # about ln(vocabulary) for a random model on characters
    assert "attention entropy per head" in out


def test_trace_flat_writes_dot_json_and_html(tmp_path, capsys):
    dot, js, page = tmp_path / "g.dot", tmp_path / "t.json", tmp_path / "t.html"
    assert main(["trace", "--flat", "--batch-size", "1", "--tokens", "8", "--dot", str(dot), "--json", str(js),
                 "--html", str(page)]) == 0
    out = capsys.readouterr().out
    node_lines = [line for line in out.splitlines() if re.match(r"^ +\d+  [A-Z]", line)]
    assert len(node_lines) == DEFAULT_NODES
    assert node_lines[0].split()[1] == "CrossEntropy" and "1x8x" in node_lines[1]  # logits [1, 8, vocab]
    records = json.loads(js.read_text())
    assert len(records["nodes"]) == DEFAULT_NODES
    assert dot.read_text().startswith("digraph backward {") and dot.read_text().count(" -> ") > DEFAULT_NODES
    assert page.read_text().count("<details>") == len({n["module"] for n in records["nodes"]})
    for path in (dot, js, page):
        assert f"wrote {path}" in out


def test_trace_of_a_trained_checkpoint(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--emb-dim", "16", "--n-layers", "1", "--n-heads", "2",
                 "--context-length", "16", "--batch-size", "2", "--max-steps", "2", "--no-progress",
                 "--sample-tokens", "5"]) == 0
    capsys.readouterr()
    assert main(["trace", "--checkpoint", str(run), "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {run}" in out and "batch 2 x 16 tokens" in out
    assert f"{20 + 6} backward nodes" in out  # one block


def test_trace_layer_and_module_keep_that_part_of_the_table(capsys):
    assert main(["trace", "--flat", "--layer", "2", "--module", "att", "--batch-size", "1", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "only trf_blocks.2.att and below" in out
    modules = {line.split()[2] for line in out.splitlines() if re.match(r"^ +\d+  [A-Z]", line)}
    assert modules == {"trf_blocks.2.att", *(f"trf_blocks.2.att.{p}" for p in ("W_query", "W_key", "W_value", "out_proj"))}
    assert main(["trace", "--layer", "1", "--batch-size", "1", "--tokens", "8"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("trf_blocks.")]
    assert rows and all(row.startswith("trf_blocks.1") for row in rows)


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "500"], "--tokens must be <= the model's context_length 128, got 500"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--model", "gpt5"], "argument --model: invalid choice: 'gpt5'"),
    (["--checkpoint", "no/such/run"], "argument --checkpoint: no such file or folder: no/such/run"),
    (["--dot", "no/such/folder/g.dot"], "--dot no/such/folder/g.dot: the folder no/such/folder does not exist"),
    (["--model", "gpt2-small", "--checkpoint", "."], "not allowed with argument"),
    (["--layer", "4"], "--layer must be < the model's 4 blocks (0 to 3), got 4"),
    (["--layer", "0", "--module", "attn"], "--module attn: no such module below trf_blocks.0; choose from att, att.W_key"),
    (["--module", "blocks"], "--module blocks: no such module in the model; choose from drop_emb, final_norm, out_head"),
])
def test_trace_mistakes_are_one_line_with_exit_status_2(argv, message, capsys):
    assert main(["trace", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_backprop_tour_script_traces_a_block_finds_the_nan_and_checks_both_solutions(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "backprop_tour.py"
    out = subprocess.run([sys.executable, str(script), "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "20 backward nodes" in out  # block 0 alone
    assert re.search(r"module: +trf_blocks\.1\.att\.W_key\n", out) and "backprop_tour.py:" in out
    assert "FAIL: 1 of 3 gradients wrong (dx)" in out and "PASS: all 3 gradients right" in out
    assert (tmp_path / "layer_norm.py").exists()
