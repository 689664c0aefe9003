#!/usr/bin/env bash
# The whole CUDA check of tinygpt in one command, for a machine with an NVIDIA GPU, CuPy and
# PyTorch (issue 11: nothing on the CUDA path had ever run on a GPU).
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# Steps, each with its own time limit (seconds, override with the variable named), in about
# 9.5 minutes at most altogether:
#   1. CuPy sees a GPU and tinygpt's "cuda" backend works; otherwise say why and stop (exit 3).
#   2. the machine: nvidia-smi -q, cupy.show_config(), versions of cupy/torch/numpy.
#   3. the kernel tests: every tests/test_*kernel*.py, whole (fast kernels against the plain
#      path, compile checks)                                           GPU_CHECK_T_KERNELS=90
#   4. every test's cuda variant: pytest tests -k cuda (the `device` fixture's "cuda" run of
#      gradcheck, torch parity of the ops, the model, generation...)  GPU_CHECK_T_CUDA_TESTS=180
#   5. a training step, 124M, batch 8 x 1024, tinygpt against PyTorch eager on the GPU
#                                                                       GPU_CHECK_T_TRAIN=90
#   6. the same on a small GPT without dropout: the two engines' losses must agree
#                                                                       GPU_CHECK_T_LOSSES=45
#   7. generation, 124M shape, with and without the KV cache          GPU_CHECK_T_GENERATE=45
#   8. causal attention at T = 1024 and 4096: the tiled kernel against the untiled op and
#      PyTorch, time and memory (tests/test_flash_attention.py runs in step 3)
#                                                                       GPU_CHECK_T_ATTENTION=60
#   9. cached decoding at batch 1 against the gemv roofline and transformers
#                                                                       GPU_CHECK_T_DECODE=60
#
# Every figure lands in OUT_DIR: *.log (each step's output), pytest-*.xml (JUnit), *.json
# (benchmarks), nvidia-smi.txt, versions.txt, steps.tsv (step, exit code, seconds) and
# summary.txt (what is printed at the end, by gpu_check_summary.py). A failing step does not
# stop the run.
#
# Exit code: 0 every step passed; 1 a step failed or timed out, or no CUDA test ran;
# 2 usage; 3 no usable GPU (nothing was run).
#
# On a fresh machine where the repository is copied but not installed, it runs
# `pip install -e . --no-deps` (nothing is downloaded: CuPy, PyTorch and NumPy must be there).
set -u -o pipefail

usage="usage: bash benchmarks/gpu_check.sh OUT_DIR  (writes every figure of the CUDA check there)"
if [ "$#" -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "$usage" >&2
    exit 2
fi
out=$1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
mkdir -p "$out" || { echo "gpu_check: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
py=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "$py" ]; then
    echo "gpu_check: no python on PATH (set PYTHON=...)" >&2
    exit 2
fi
started=$(date +%s)

# ---------------------------------------------------------------- 1. is there a GPU?
# CuPy first, on its own: tinygpt's cuda tests skip themselves without a GPU, so a run
# without one would look green while checking nothing.
gpu=$("$py" - <<'EOF' 2>&1
import sys
try:
    import cupy
except Exception as e:
    sys.exit(f"CuPy cannot be imported ({type(e).__name__}: {e})")
try:
    count = cupy.cuda.runtime.getDeviceCount()
    if count < 1:
        raise RuntimeError("no CUDA device")
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    if int(cupy.arange(10).sum()) != 45:
        raise RuntimeError("a sum on the GPU gave a wrong result")
except Exception as e:
    sys.exit(f"CuPy {cupy.__version__} is installed but sees no usable GPU ({type(e).__name__}: {e})")
print(f"CuPy {cupy.__version__} sees {count} GPU(s); device 0: {name}")
EOF
)
gpu_rc=$?
if [ "$gpu_rc" -ne 0 ]; then
    {
        echo "gpu_check: no GPU: ${gpu##*$'\n'}"
        echo "gpu_check: this script checks tinygpt's CUDA path and needs an NVIDIA GPU with CuPy; nothing was run."
    } | tee "$out/no-gpu.txt" >&2
    exit 3
fi
echo "gpu_check: $gpu"

if ! "$py" -c "import tinygpt" 2>/dev/null; then
    echo "gpu_check: tinygpt is not importable: pip install -e . --no-deps"
    "$py" -m pip install -q -e . --no-deps >"$out/install.log" 2>&1 || echo "gpu_check: the install failed, see $out/install.log"
fi
backend=$("$py" -c "
from tinygpt import backend
try:
    backend.get_backend('cuda')
except Exception as e:
    raise SystemExit(f'tinygpt cuda backend unusable: {type(e).__name__}: {e}')
print('tinygpt cuda backend: ok')" 2>&1)
backend_rc=$?
echo "gpu_check: ${backend##*$'\n'}"
if [ "$backend_rc" -ne 0 ]; then
    echo "gpu_check: ${backend##*$'\n'}" >"$out/no-gpu.txt"
    exit 3
fi

# ---------------------------------------------------------------- step runner
printf 'step\texit_code\tseconds\tstatus\n' >"$out/steps.tsv"
failed=0

# run_step NAME TIMEOUT COMMAND...: the command's output to NAME.log, its result to steps.tsv.
run_step() {
    local name=$1 limit=$2 start rc status
    shift 2
    echo "gpu_check: [$name] (limit ${limit} s) $*"
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        124 | 137) status="timed out after ${limit} s" ;;
        *) status=failed ;;
    esac
    [ "$rc" -eq 0 ] || failed=1
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" "$status" >>"$out/steps.tsv"
    echo "gpu_check: [$name] $status ($(($(date +%s) - start)) s); tail of $name.log:"
    tail -n 3 "$out/$name.log" | awk '{ print "    " $0 }'
}

# ---------------------------------------------------------------- 2. the machine
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "$gpu"
    "$py" -c "import sys, numpy; print('python', sys.version.split()[0], '| numpy', numpy.__version__)"
    "$py" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu:', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
    "$py" -m pip freeze 2>/dev/null | grep -i -E '^(cupy|torch|numpy|nvidia-|transformers|safetensors)' || echo "(pip freeze lists none of cupy, torch, numpy)"
} >"$out/versions.txt" 2>&1
"$py" -c "import cupy; cupy.show_config()" >"$out/cupy-config.txt" 2>&1
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi -q >"$out/nvidia-smi.txt" 2>&1
    timeout 30 nvidia-smi >>"$out/versions.txt" 2>&1
else
    echo "nvidia-smi is not on PATH" >"$out/nvidia-smi.txt"
fi

# ---------------------------------------------------------------- 3-4. tests
pytest_args=(-q -rfE --durations=15 -p no:cacheprovider -o junit_family=xunit2)
shopt -s nullglob
kernel_tests=(tests/test_*kernel*.py tests/test_flash_attention.py)  # tests/test_kernels.py and the tiled attention's
shopt -u nullglob
if [ "${#kernel_tests[@]}" -gt 0 ]; then
    run_step pytest-kernels "${GPU_CHECK_T_KERNELS:-90}" \
        "$py" -m pytest "${pytest_args[@]}" --junitxml="$out/pytest-kernels.xml" "${kernel_tests[@]}"
else
    echo "gpu_check: no tests/test_*kernel*.py found" | tee "$out/pytest-kernels.log"
    failed=1
fi
run_step pytest-cuda "${GPU_CHECK_T_CUDA_TESTS:-180}" \
    "$py" -m pytest "${pytest_args[@]}" --junitxml="$out/pytest-cuda.xml" --ignore=tests/test_flash_attention.py \
    -k cuda --ignore-glob='tests/test_*kernel*.py' tests

# ---------------------------------------------------------------- 5-9. benchmarks
run_step train-step "${GPU_CHECK_T_TRAIN:-90}" "$py" benchmarks/train_step.py --device cuda --batch 8 --tokens 1024 \
    --warmup 2 --repeats 5 --json "$out/train_step.json"
run_step train-step-losses "${GPU_CHECK_T_LOSSES:-45}" "$py" benchmarks/train_step.py --device cuda --n-layers 2 \
    --batch 4 --tokens 256 --drop-rate 0 --warmup 1 --repeats 2 --json "$out/train_step_losses.json"
run_step generate "${GPU_CHECK_T_GENERATE:-45}" "$py" benchmarks/generate.py --device cuda --new-tokens 100 \
    --repeats 3 --json "$out/generate.json"
run_step attention "${GPU_CHECK_T_ATTENTION:-60}" "$py" benchmarks/attention.py --device cuda --tokens 1024,4096 \
    --repeats 3 --json "$out/attention.json"
run_step decode "${GPU_CHECK_T_DECODE:-60}" "$py" benchmarks/decode.py --device cuda --new-tokens 100 --rounds 3 \
    --json "$out/decode.json"

# ---------------------------------------------------------------- summary
echo
"$py" benchmarks/gpu_check_summary.py "$out" "$(($(date +%s) - started))" | tee "$out/summary.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
if [ "$failed" -ne 0 ]; then
    echo "gpu_check: FAILED (see $out/steps.tsv and the logs there)"
    exit 1
fi
echo "gpu_check: all steps passed"
