"""The summary at the end of benchmarks/gpu_check.sh: one screen from the files of its run.

    python benchmarks/gpu_check_summary.py OUT_DIR SECONDS

Reads OUT_DIR's steps.tsv, pytest-*.xml (JUnit), train_step*.json, generate.json, attention.json and
decode.json, prints
what they say, and exits 1 when no CUDA test ran (every cuda variant skips itself on a machine
where tinygpt's cuda backend does not load, and such a run must not pass for a check) or when
the dropout-free step's first losses of tinygpt and PyTorch on the GPU differ by more than
LOSS_RTOL: the same weights and tokens in float32 give the same loss to about 1e-6.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GB = 1024**3
LOSS_RTOL = 1e-4


def step_lines(out: Path) -> list[str]:
    """steps.tsv: step, exit code, seconds, status."""
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:] if line]
    return [f"  {name:<18} {status:<24} {seconds:>4} s" for name, _, seconds, status in rows]


def junit_counts(path: Path) -> dict[str, int]:
    """tests, failures, errors, skipped and passed of a JUnit file (one suite or several)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def train_step_line(report: dict) -> str:
    line = ", ".join(f"{engine} {r['median_s'] * 1000:.1f} ms/step, {r['peak_bytes'] / GB:.2f} GB"
                     for engine, r in report["engines"].items())
    ratio = report.get("tinygpt_over_torch")
    if ratio:
        line += (f"; tinygpt/torch time {ratio['step_time']:.2f}, memory {ratio['peak_memory']:.2f}, "
                 f"first-loss difference {ratio['first_loss_difference']:+.1e}")
    return line


def losses_agree(report: dict) -> bool:
    ratio, engines = report.get("tinygpt_over_torch"), report["engines"]
    return bool(ratio) and abs(ratio["first_loss_difference"]) <= LOSS_RTOL * abs(engines["torch"]["first_loss"])


def summarize(out: Path, seconds: int) -> tuple[list[str], bool]:
    """(lines to print, whether the run passes: a CUDA test ran, and the losses agree where measured)."""
    lines = [f"=== tinygpt GPU check: {out} ({seconds} s) ==="]
    versions = out / "versions.txt"
    if versions.exists():
        lines += versions.read_text().splitlines()[1:2]  # the line that names the GPU
    lines += step_lines(out)
    cuda_ran = False
    for name in ("kernels", "cuda"):
        path = out / f"pytest-{name}.xml"
        if not path.exists():
            lines.append(f"  pytest {name}: no JUnit file (the step did not finish)")
            continue
        n = junit_counts(path)
        lines.append(f"  pytest {name}: {n['tests']} tests, {n['passed']} passed, {n['failures']} failed, "
                     f"{n['errors']} errors, {n['skipped']} skipped")
        cuda_ran |= name == "cuda" and n["tests"] > n["skipped"]
    ok = cuda_ran
    for name in ("train_step", "train_step_losses"):
        path = out / f"{name}.json"
        if path.exists():
            report = json.loads(path.read_text())
            lines.append(f"  {name}: {train_step_line(report)}")
            if name == "train_step_losses" and not losses_agree(report):
                lines.append(f"  LOSSES DISAGREE: tinygpt and PyTorch differ by more than {LOSS_RTOL:.0e} relative")
                ok = False
    path = out / "generate.json"
    if path.exists():
        rates = json.loads(path.read_text())["tokens_per_s"]
        lines.append("  generate: " + ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'} tokens/s" for k, v in rates.items()))
    path = out / "attention.json"
    if path.exists():
        for r in json.loads(path.read_text())["results"]:
            memory = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f} MiB"
            lines.append(f"  attention T={r['tokens']} {r['engine']}: {r['median_s'] * 1000:.1f} ms, {memory}")
    path = out / "decode.json"
    if path.exists():
        rates = json.loads(path.read_text())["median_tokens_per_s"]
        lines.append("  decode: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " tokens/s")
    if not cuda_ran:
        lines.append("  NO CUDA TEST RAN: the cuda variants were all skipped, or their step did not finish")
    return lines, ok


def main() -> int:
    out, seconds = Path(sys.argv[1]), int(sys.argv[2])
    lines, ok = summarize(out, seconds)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
