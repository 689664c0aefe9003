"""benchmarks/gpu_check.sh without a GPU: it says so clearly and runs nothing; and, with a
stand-in CuPy that "sees" a GPU and a stand-in python whose pytest and benchmark runs are
canned, every step runs with its own limit, a failing or hanging step does not stop the
others, the summary reports the figures, and the exit code says whether all passed. The real
benchmark JSON (train_step.py on the CPU, tiny) goes through the same summary."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check_summary  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

CUPY_MISSING = 'raise ImportError("hidden by the test")\n'
CUPY_WITHOUT_DEVICE = '''__version__ = "0.0+fake"
class _Runtime:
    @staticmethod
    def getDeviceCount():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
class cuda:
    runtime = _Runtime
'''
CUPY_WITH_DEVICE = '''from numpy import *  # a stand-in whose arrays are NumPy's
__version__ = "0.0+fake"
class _Runtime:
    @staticmethod
    def getDeviceCount():
        return 1
    @staticmethod
    def getDeviceProperties(index):
        return {"name": b"Fake H200"}
class cuda:
    runtime = _Runtime
def show_config():
    print("fake CuPy")
'''

# A python that records its calls and fakes pytest and the two benchmarks; anything else
# (the GPU check, the summary, version lines) runs the real interpreter.
FAKE_PYTHON = '''#!{python}
import json, os, sys, time
args = sys.argv[1:]
LOSS_GAP = float(os.environ.get("FAKE_LOSS_GAP", "1e-6"))
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
def option(name):
    return next(a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args) if a.split("=")[0] == name)
if args[:2] == ["-m", "pytest"]:
    junit = option("--junitxml")
    which = "kernels" if "kernels" in junit else "cuda"
    failures = int(os.environ.get("FAKE_FAIL") == which)
    with open(junit, "w") as f:
        f.write(f'<testsuites><testsuite name="pytest" tests="5" failures="{{failures}}" errors="0" skipped="1">'
                '</testsuite></testsuites>')
    sys.exit(failures)
if args and args[0].endswith(("train_step.py", "generate.py", "attention.py", "decode.py")):
    if os.environ.get("FAKE_HANG") == os.path.basename(args[0]):
        time.sleep(60)
    report = ({{"tokens_per_s": {{"tinygpt, KV cache": 123.4, "transformers": None}}}} if args[0].endswith("generate.py") else
              {{"results": [{{"tokens": 4096, "engine": "tinygpt tiled", "median_s": 0.5, "peak_extra_bytes": 2**20}}]}}
              if args[0].endswith("attention.py") else
              {{"median_tokens_per_s": {{"tinygpt": 50.0, "roofline": 55.0}}}} if args[0].endswith("decode.py") else
              {{"engines": {{"tinygpt": {{"median_s": 0.25, "peak_bytes": 2 * 2**30, "first_loss": 10.0}},
                          "torch": {{"median_s": 0.125, "peak_bytes": 2**30, "first_loss": 10.0 - LOSS_GAP}}}},
               "tinygpt_over_torch": {{"step_time": 2.0, "peak_memory": 2.0, "first_loss_difference": LOSS_GAP}}}})
    with open(option("--json"), "w") as f:
        json.dump(report, f)
    sys.exit(0)
os.execv(sys.executable, [sys.executable] + args)
'''


def fake_cupy(tmp_path, source: str) -> Path:
    folder = tmp_path / "fake-cupy"
    (folder / "cupy").mkdir(parents=True)
    (folder / "cupy" / "__init__.py").write_text(source)
    return folder


def run_script(tmp_path, cupy_source: str, *args, fake_python=False, **env):
    environment = {**os.environ, "PYTHONPATH": str(fake_cupy(tmp_path, cupy_source)), "PYTHON": sys.executable, **env}
    if fake_python:
        python = tmp_path / "fake-python"
        python.write_text(FAKE_PYTHON.format(python=sys.executable))
        python.chmod(0o755)
        environment |= {"PYTHON": str(python), "FAKE_CALLS": str(tmp_path / "calls.jsonl")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment,
                          cwd=tmp_path, timeout=120)


def calls(tmp_path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_without_cupy_it_says_there_is_no_gpu_exits_3_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    result = run_script(tmp_path, CUPY_MISSING, str(out))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "gpu_check: no GPU: CuPy cannot be imported (ImportError: hidden by the test)" in result.stderr
    assert "needs an NVIDIA GPU with CuPy; nothing was run" in result.stderr
    assert [p.name for p in out.iterdir()] == ["no-gpu.txt"]


def test_with_cupy_but_no_device_it_names_cupys_error_and_exits_3(tmp_path):
    result = run_script(tmp_path, CUPY_WITHOUT_DEVICE, str(tmp_path / "out"))
    assert result.returncode == 3
    assert ("gpu_check: no GPU: CuPy 0.0+fake is installed but sees no usable GPU "
            "(RuntimeError: cudaErrorNoDevice: no CUDA-capable device is detected)") in result.stderr


@pytest.mark.parametrize("args", [(), ("a", "b"), ("--help",)], ids=["none", "two", "option"])
def test_anything_but_one_output_directory_prints_the_usage_and_exits_2(tmp_path, args):
    result = run_script(tmp_path, CUPY_MISSING, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: bash benchmarks/gpu_check.sh OUT_DIR")


def test_with_a_gpu_every_step_runs_and_all_passing_exits_0_with_the_figures_in_the_summary(tmp_path):
    out = tmp_path / "out"
    result = run_script(tmp_path, CUPY_WITH_DEVICE, str(out), fake_python=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CuPy 0.0+fake sees 1 GPU(s); device 0: Fake H200" in result.stdout
    assert result.stdout.rstrip().endswith("gpu_check: all steps passed")
    made = [c for c in calls(tmp_path) if c[:2] == ["-m", "pytest"] or c[0].startswith("benchmarks/")]
    pytest_runs = [c for c in made if c[:2] == ["-m", "pytest"]]
    assert any(arg.startswith("tests/test_") and "kernel" in arg for arg in pytest_runs[0])  # the kernel files, by path
    assert pytest_runs[1][-4:] == ["-k", "cuda", "--ignore-glob=tests/test_*kernel*.py", "tests"]
    train = next(c for c in made if c[0] == "benchmarks/train_step.py")
    assert " ".join(train).startswith("benchmarks/train_step.py --device cuda --batch 8 --tokens 1024")
    assert any(c[:3] == ["benchmarks/generate.py", "--device", "cuda"] for c in made)
    steps = (out / "steps.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in steps] == \
        ["step", "pytest-kernels", "pytest-cuda", "train-step", "train-step-losses", "generate", "attention", "decode"]
    assert all(line.split("\t")[1:2] == ["0"] for line in steps[1:])
    summary = (out / "summary.txt").read_text()
    assert "pytest cuda: 5 tests, 4 passed, 0 failed, 0 errors, 1 skipped" in summary
    assert "tinygpt 250.0 ms/step, 2.00 GB, torch 125.0 ms/step, 1.00 GB; tinygpt/torch time 2.00" in summary
    assert "generate: tinygpt, KV cache 123.4 tokens/s, transformers - tokens/s" in summary
    assert "attention T=4096 tinygpt tiled: 500.0 ms, 1 MiB" in summary
    assert "decode: tinygpt 50.0, roofline 55.0 tokens/s" in summary
    for name in ("versions.txt", "nvidia-smi.txt", "cupy-config.txt", "pytest-cuda.log", "train_step.json"):
        assert (out / name).exists(), name


def test_a_failing_test_step_and_a_hanging_benchmark_do_not_stop_the_run_and_exit_1(tmp_path):
    out = tmp_path / "out"
    result = run_script(tmp_path, CUPY_WITH_DEVICE, str(out), fake_python=True, FAKE_FAIL="kernels",
                        FAKE_HANG="generate.py", GPU_CHECK_T_GENERATE="1")
    assert result.returncode == 1, result.stdout + result.stderr
    status = {line.split("\t")[0]: line.split("\t")[3] for line in (out / "steps.tsv").read_text().splitlines()[1:]}
    assert status == {"pytest-kernels": "failed", "pytest-cuda": "passed", "train-step": "passed",
                      "train-step-losses": "passed", "generate": "timed out after 1 s", "attention": "passed",
                      "decode": "passed"}
    summary = (out / "summary.txt").read_text()
    assert "pytest kernels: 5 tests, 3 passed, 1 failed" in summary and "train_step: tinygpt 250.0 ms/step" in summary
    assert "gpu_check: FAILED" in result.stdout


def test_the_summary_fails_when_no_cuda_test_ran(tmp_path):
    (tmp_path / "steps.tsv").write_text("step\texit_code\tseconds\tstatus\npytest-cuda\t0\t3\tpassed\n")
    (tmp_path / "pytest-cuda.xml").write_text('<testsuites><testsuite tests="7" failures="0" errors="0" skipped="7"/>'
                                              "</testsuites>")
    lines, cuda_ran = gpu_check_summary.summarize(tmp_path, 3)
    assert cuda_ran is False and "  pytest cuda: 7 tests, 0 passed, 0 failed, 0 errors, 7 skipped" in lines
    assert any("NO CUDA TEST RAN" in line for line in lines)


def test_the_summary_reads_the_json_that_train_step_py_really_writes(tmp_path):
    """tinygpt alone (a torch worker would double the time); the two-engine ratio line is
    covered by the canned report above, whose keys are train_step.py's."""
    report = tmp_path / "train_step.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--emb-dim", "8", "--n-layers", "1",
                    "--n-heads", "2", "--vocab-size", "20", "--context-length", "8", "--batch", "1", "--tokens", "4",
                    "--repeats", "1", "--warmup", "0", "--pause", "0", "--engines", "tinygpt", "--json", str(report)],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    line = gpu_check_summary.train_step_line(json.loads(report.read_text()))
    assert line.startswith("tinygpt ") and line.endswith(" GB") and " ms/step, " in line


@pytest.mark.parametrize("gap, ok", [(1e-6, True), (1e-2, False)])
def test_the_summary_fails_when_tinygpt_and_torch_losses_disagree_on_the_gpu(tmp_path, gap, ok):
    (tmp_path / "steps.tsv").write_text("step\texit_code\tseconds\tstatus\n")
    (tmp_path / "pytest-cuda.xml").write_text('<testsuite tests="2" failures="0" errors="0" skipped="0"/>')
    engines = {"tinygpt": {"median_s": 0.1, "peak_bytes": GB, "first_loss": 10.0 + gap},
               "torch": {"median_s": 0.1, "peak_bytes": GB, "first_loss": 10.0}}
    ratios = {"step_time": 1.0, "peak_memory": 1.0, "first_loss_difference": gap}
    (tmp_path / "train_step_losses.json").write_text(json.dumps({"engines": engines, "tinygpt_over_torch": ratios}))
    lines, passed = gpu_check_summary.summarize(tmp_path, 1)
    assert passed is ok
    assert any("LOSSES DISAGREE" in line for line in lines) is not ok
