"""The fast kernels (tinygpt/kernels/) against the plain math of functional.py and optim.py.

The plain op is the reference; every fast path must give its numbers:
  - on the CPU (kernels/cpu.py), element by element, on awkward shapes: one row, row counts
    that are not a multiple of the block, size-1 dims, 2-D attention, float32 and float64,
    with blocks made small so that many run on two threads;
  - the switch: TINYGPT_KERNELS / set_kernels("plain") routes every op to its plain math;
  - kernels/cuda.py without a GPU: its interface matches cpu.py's, its attention glue runs
    on NumPy stand-ins for the row kernels, and (when nvcc is on PATH) every CUDA source
    compiles for float and double;
  - on a GPU: every op's CUDA path against its plain path on the GPU, and gradcheck on rows
    longer than a warp.
"""
from __future__ import annotations

import inspect
import math
import os
import platform
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

import tinygpt as tg
import tinygpt.functional as F
from tinygpt import backend, kernels
from tinygpt import dispatch
from tinygpt.functional.activations import GELU_CUBIC, SQRT_2_OVER_PI
from tinygpt.kernels import cpu, fused, threads
from tinygpt.kernels import cuda as ck
from tinygpt.opcase import FixedPicker
from tinygpt.opsuite import CASES
from tinygpt.optim import AdamW
from conftest import host


@pytest.fixture
def mode():
    """Restores the kernels mode a test changes."""
    before = dispatch.kernels_mode()
    yield dispatch.set_kernels
    dispatch.set_kernels(before)


def _run(fn, inputs, dtype, device="cpu"):
    """fn's output and the gradients of sum(output * r) for every input, as NumPy arrays;
    the library's RNG reseeded, so dropout draws the same mask every time."""
    tg.manual_seed(3)
    tensors = [tg.tensor(a, requires_grad=True, dtype=dtype, device=device) for a in inputs]
    out = fn(*tensors)
    r = np.random.default_rng(7).standard_normal(out.shape)
    (out * tg.tensor(r, dtype=dtype, device=device)).sum().backward()
    return [host(out)] + [None if t.grad is None else host(t.grad) for t in tensors]


def _plain_and_fast(fn, inputs, dtype, device="cpu"):
    dispatch.set_kernels("plain")
    plain = _run(fn, inputs, dtype, device)
    dispatch.set_kernels("fast")
    return plain, _run(fn, inputs, dtype, device)


def _tol(dtype, factor: float = 1.0):
    """Rounding differences only: the kernels add up in another order than the plain math."""
    rtol, atol = (2e-5, 2e-6) if dtype == np.float32 else (1e-11, 1e-12)
    return {"rtol": factor * rtol, "atol": factor * atol}


rng = np.random.default_rng(0)
SEEDS_PER_CASE = 4  # on top of each case's examples: row counts that leave short last blocks


def _inputs_on_host(built):
    return [host(x) for x in built.inputs]


@pytest.fixture
def small_blocks(monkeypatch):
    """Two threads, and blocks of 3 rows: every kernel runs many blocks side by side."""
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "2")
    monkeypatch.setattr(threads, "rows_per_block", lambda row_size, target=0: 3)
    monkeypatch.setattr(cpu, "rows_per_block", lambda row_size, target=0: 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case, overrides, examples",
                         [pytest.param(case, overrides, examples, id=test_id)
                          for case in CASES for test_id, overrides, examples in case.variants()])
def test_cpu_kernels_match_the_plain_math_element_by_element(mode, small_blocks, case, overrides, examples, dtype):
    """Every case of the one table (tinygpt/opsuite.py): its examples and more seeds, the output
    and every gradient, fast against plain (an op without a fast version compares with itself)."""
    picks = list(enumerate(examples)) + [(100 + seed, overrides) for seed in range(SEEDS_PER_CASE)]
    for seed, pinned in picks:
        built = case.run(FixedPicker(np.random.default_rng(seed), pinned))
        plain, fast = _plain_and_fast(built.fn, _inputs_on_host(built), dtype)
        for name, a, b in zip(["output"] + [f"grad {i}" for i in range(len(built.inputs))], fast, plain):
            assert (a is None) == (b is None), f"{case.name} {built.description}: {name}"
            if a is not None:  # None: an input the case's fn does not use
                assert a.shape == b.shape and a.dtype == b.dtype, f"{case.name} {built.description}: {name}"
                np.testing.assert_allclose(a, b, **_tol(dtype), err_msg=f"{case.name} {built.description}: {name}")


def test_cpu_kernels_match_the_plain_math_in_one_block_per_thread(mode, monkeypatch):
    """The default block sizes (about 1 MB), on rows that fill several blocks."""
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "2")
    x, scale, shift = rng.standard_normal((700, 1100)), rng.standard_normal(1100), rng.standard_normal(1100)
    plain, fast = _plain_and_fast(lambda x, s, b: F.gelu(F.layer_norm(x, s, b)), [x, scale, shift], np.float32)
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, **_tol(np.float32, factor=10))


def _adamw_steps(steps: int, transposed: bool, dtype) -> list[np.ndarray]:
    gen = np.random.default_rng(5)
    shapes = [(33, 65), (3,)]
    params = [tg.tensor(gen.standard_normal(s), requires_grad=True, dtype=dtype) for s in shapes]
    if transposed:  # a strided parameter: the kernel must not assume contiguous memory
        params[0] = tg.tensor(gen.standard_normal(shapes[0][::-1]), requires_grad=True, dtype=dtype)
        params[0].data = params[0].data.T
    opt = AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        for p in params:
            p.grad = tg.tensor(gen.standard_normal(p.shape), dtype=dtype)
        opt.step()
    return [host(p) for p in params]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_cpu_adamw_kernel_matches_the_plain_update(mode, monkeypatch, transposed, dtype):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "2")
    mode("plain")
    plain = _adamw_steps(3, transposed, dtype)
    mode("fast")
    fast = _adamw_steps(3, transposed, dtype)
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, **_tol(dtype))


def test_dropout_mask_drawn_in_blocks_is_the_mask_drawn_whole():
    cpu_backend = backend.get_backend("cpu")
    whole = cpu_backend.uniform((7, 9), seed=42)
    for start in (0, 1, 9, 30, 62):
        part = cpu_backend.uniform((1,), seed=42, start=start)
        assert part[0] == whole.reshape(-1)[start]
    np.testing.assert_array_equal(cpu_backend.uniform((3, 9), seed=42, start=27), whole[3:6])


@pytest.mark.parametrize("kernels_mode", ["plain", "fast"])
def test_a_data_parallel_shard_draws_its_rows_part_of_the_whole_batch_mask(mode, kernels_mode):
    """backend.batch_shard(first_row): rows 2..4 of a batch, dropped out alone, get the mask
    that rows 2..4 get when the whole batch is dropped out with the same seed (dropout and
    attention dropout, forward and backward)."""
    mode(kernels_mode)
    x = rng.standard_normal((5, 3, 4))
    q, k, v = (rng.standard_normal((5, 2, 3, 4)) for _ in range(3))

    def fn(x, q, k, v):
        return F.dropout(x, 0.4).sum() + F.scaled_dot_product_attention(q, k, v, dropout_p=0.4).sum() * 0.5

    whole = _run(fn, [x, q, k, v], np.float64)
    with backend.batch_shard(2):
        part = _run(fn, [x[2:], q[2:], k[2:], v[2:]], np.float64)
    for a, b in zip(part[1:], whole[1:]):  # the input gradients hold the masks
        np.testing.assert_allclose(a, b[2:], **_tol(np.float64))
    assert backend.mask_start((5, 3, 4)) == 0  # the with-block leaves no trace


_BIG_ARRAY_IN_THE_HEAP = """
import numpy as np
import tinygpt as tg
from tinygpt import kernels

def in_heap(array):  # glibc's heap is one mapping; a big array outside it got a mapping of its own
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            return low <= array.ctypes.data < high
    return False

before = in_heap(np.ones(1 << 24, np.float32))  # 64 MB, freed at once
kernels.module_of("cpu")
print(before, in_heap(np.ones(1 << 24, np.float32)))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_cpu_kernels_keep_freed_memory_in_the_process():
    """Once the CPU kernels load, a 64 MB array comes from the heap (freed memory is kept for
    the next arrays) instead of a mapping of its own that is unmapped when it is freed; in a
    fresh process, since the setting is the process's."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", _BIG_ARRAY_IN_THE_HEAP], capture_output=True, text=True, env=environ,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


# ============================================================================ the switch


class _Spy:
    """Stands in for a kernels module: records each call, then runs the CPU kernel."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return getattr(cpu, name)(*args, **kwargs)
        return call


def _gpt_step():
    from tinygpt.model import GPTModel

    tg.manual_seed(1)
    model = GPTModel({"vocab_size": 11, "context_length": 4, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
                      "drop_rate": 0.2, "qkv_bias": False})
    ids = np.arange(8).reshape(2, 4) % 11
    F.cross_entropy(model(ids), (ids + 1) % 11).backward()
    AdamW(model.parameters()).step()


def _llama_step():
    from tinygpt.llama import LlamaModel

    tg.manual_seed(1)
    model = LlamaModel({"vocab_size": 11, "context_length": 4, "emb_dim": 8, "n_heads": 2, "n_kv_heads": 1,
                        "n_layers": 1, "hidden_dim": 12})
    ids = np.arange(8).reshape(2, 4) % 11
    F.cross_entropy(model(ids), (ids + 1) % 11).backward()


def test_every_fused_op_routes_through_the_kernels_and_plain_mode_routes_none(mode, monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(kernels, "module_of", lambda device: spy if device == "cpu" else None)
    mode("fast")
    _gpt_step()
    _llama_step()
    assert set(spy.calls) == set(kernels.INTERFACE)  # a GPT and a Llama training step use every kernel
    spy.calls.clear()
    mode("plain")
    _gpt_step()
    _llama_step()
    assert spy.calls == []


def test_unknown_kernels_mode_is_an_error_naming_the_allowed_ones(mode, monkeypatch):
    with pytest.raises(ValueError, match=r"kernels must be one of 'fast', 'plain', got 'turbo'"):
        mode("turbo")
    monkeypatch.setattr(dispatch, "_mode", None)
    monkeypatch.setenv("TINYGPT_KERNELS", "fastest")
    with pytest.raises(ValueError, match=r"TINYGPT_KERNELS must be one of 'fast', 'plain', got 'fastest'"):
        dispatch.kernels_mode()
    monkeypatch.setenv("TINYGPT_KERNELS", "plain")
    assert dispatch.kernels_mode() == "plain"


def test_tg_set_kernels_is_the_switch_every_op_reads(mode):
    tg.set_kernels("plain")
    assert tg.kernels_mode() == "plain" and dispatch.implementation(F.LayerNorm, np.zeros(3)) is F.LayerNorm
    tg.set_kernels("fast")
    assert dispatch.implementation(F.LayerNorm, np.zeros(3)) is fused.LayerNorm


def test_strict_backend_has_no_fast_path(mode):
    mode("fast")
    assert dispatch.implementation(F.GELU, backend.get_backend("strict").xp.zeros(3)) is F.GELU
    assert dispatch.implementation(F.GELU, np.zeros(3)) is fused.GELU


def test_cpu_and_cuda_kernels_have_the_same_interface():
    for module in (cpu, ck):
        for name in kernels.INTERFACE:
            assert inspect.isfunction(getattr(module, name, None)), f"{module.__name__} has no {name}"
    for name in kernels.INTERFACE:
        ours, theirs = inspect.signature(getattr(cpu, name)), inspect.signature(getattr(ck, name))
        assert [(p.name, p.kind) for p in ours.parameters.values()] == [(p.name, p.kind) for p in theirs.parameters.values()], name


# ============================================================================ cuda.py's glue, on the host


class NumpyKernels:
    """The cuda_kernels interface in NumPy, each function its docstring's formula. Asserts the
    contract on what it receives, and logs each call by name."""

    def __init__(self):
        self.calls: list[str] = []

    def gelu_forward(self, x):
        self.calls.append("gelu_forward")
        return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x**3)))

    def gelu_backward(self, x, grad):
        self.calls.append("gelu_backward")
        assert grad.shape == x.shape
        t = np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x**3))
        return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3 * GELU_CUBIC * x * x))

    def layer_norm_forward(self, x2, scale, shift, eps):
        self.calls.append("layer_norm_forward")
        assert x2.ndim == 2 and scale.shape == shift.shape == x2.shape[1:] and isinstance(eps, float)
        mean = x2.mean(axis=1, keepdims=True)
        rstd = 1.0 / np.sqrt(((x2 - mean) ** 2).mean(axis=1, keepdims=True) + eps)
        xhat = (x2 - mean) * rstd
        return xhat * scale + shift, xhat, rstd

    def layer_norm_backward(self, g2, xhat, rstd, scale):
        self.calls.append("layer_norm_backward")
        assert g2.shape == xhat.shape and rstd.shape == (xhat.shape[0], 1) and scale.shape == xhat.shape[1:]
        dxhat = g2 * scale
        grad_x = rstd * (dxhat - dxhat.mean(axis=1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=1, keepdims=True))
        return grad_x, (g2 * xhat).sum(axis=0), g2.sum(axis=0)

    def attention_softmax_(self, p, scale, causal):
        self.calls.append("attention_softmax_")
        assert p.ndim >= 2 and p.flags.c_contiguous
        tq, tk = p.shape[-2:]
        s = p * scale
        if causal:
            s[..., np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq)] = -np.inf
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p[...] = e / e.sum(axis=-1, keepdims=True)

    def softmax_backward_(self, dp, p, scale):
        self.calls.append("softmax_backward_")
        assert dp.shape == p.shape and dp.flags.c_contiguous
        dp[...] = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale

    def logsumexp_rows(self, z):
        self.calls.append("logsumexp_rows")
        assert z.ndim == 2
        m = z.max(axis=1, keepdims=True)
        return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]

    def cross_entropy_backward(self, z, lse, t, weight):
        self.calls.append("cross_entropy_backward")
        n = z.shape[0]
        assert z.ndim == 2 and lse.shape == (n,) and t.shape == (n,) and t.dtype.kind in "iu" and weight.shape == (n, 1)
        dz = np.exp(z - lse[:, None])
        dz[np.arange(n), t] -= 1.0
        return dz * weight

    def adamw_step_(self, w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction):
        self.calls.append("adamw_step_")
        assert w.shape == g.shape == m.shape == v.shape
        w *= 1.0 - lr * weight_decay
        m[...] = beta1 * m + (1.0 - beta1) * g
        v[...] = beta2 * v + (1.0 - beta2) * g * g
        w -= step_size * m / (np.sqrt(v) * rsqrt_correction + eps)




@pytest.mark.parametrize("causal, dropout_p", [(True, 0.0), (False, 0.3)])
def test_cuda_attention_glue_matches_the_plain_math_with_numpy_row_kernels(mode, monkeypatch, causal, dropout_p):
    """cuda.attention_forward/backward compose the row kernels with products and dropout;
    run that composition on NumPy, the row kernels replaced by their formulas."""
    stand_in = NumpyKernels()
    monkeypatch.setattr(ck, "attention_softmax_", stand_in.attention_softmax_)
    monkeypatch.setattr(ck, "softmax_backward_", stand_in.softmax_backward_)
    monkeypatch.setattr(ck, "dropout", cpu.dropout)  # the CPU's mask: the plain op draws the same
    monkeypatch.setattr(kernels, "module_of", lambda device: ck)
    inputs = [rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 3, 6, 2))]

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p)

    routed = _run(fn, inputs, np.float64)
    assert stand_in.calls == ["attention_softmax_", "attention_softmax_", "softmax_backward_"]  # backward recomputes P
    monkeypatch.undo()
    mode("plain")
    for a, b in zip(routed, _run(fn, inputs, np.float64)):
        np.testing.assert_allclose(a, b, **_tol(np.float64))


# ============================================================================ compile check (nvcc)

_NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(_NVCC is None, reason="nvcc is not on PATH: CUDA sources not compile-checked")
_C_TYPES = {"T": "T", "int64": "long long", "int32": "int", "float64": "double", "float32": "float"}


def _params(spec: str) -> list[tuple[str, str]]:
    """'T x, int64 V' -> [('T', 'x'), ('long long', 'V')]"""
    return [(_C_TYPES[p.split()[0]], p.split()[1]) for p in spec.split(",")]


def _check_kernel(name: str, inputs: str, outputs: str, body: str) -> str:
    """A kernel template over T that declares each argument as CuPy's generated code does
    (`const T &x` for inputs, `T &y` for outputs, at element i) around `body`."""
    ins, outs = _params(inputs), _params(outputs)
    args = [f"const {t}* _raw_{n}" for t, n in ins] + [f"{t}* _raw_{n}" for t, n in outs]
    refs = [f"const {t} &{n} = _raw_{n}[i];" for t, n in ins] + [f"{t} &{n} = _raw_{n}[i];" for t, n in outs]
    return (f"template <typename T>\n__global__ void check_{name}({', '.join(args)}, long long _n) {{\n"
            f"  for (long long i = 0; i < _n; ++i) {{\n    {' '.join(refs)}\n{body}\n  }}\n}}\n")


def elementwise_check(src: ck.ElementwiseSource) -> str:
    return _check_kernel(src.name, src.in_params, src.out_params, src.operation)


def reduction_check(src: ck.ReductionSource) -> str:
    """map_expr, reduce_expr (over a and b) and post_map_expr, as CuPy's reduction uses them."""
    body = (f"    T a = T({src.identity}); const T b = T({src.map_expr}); a = ({src.reduce_expr});\n"
            f"    {src.post_map_expr};")
    return _check_kernel(src.name, src.in_params, src.out_params, body)


def compile_check_source(row_source: str, row_names, elementwise, reductions) -> str:
    """One CUDA file: the row kernels and a check kernel per elementwise and reduction source,
    each template instantiated for float and double (templates are only fully checked when
    instantiated; taking their addresses instantiates them, as CuPy's name_expressions do)."""
    names = list(row_names) + [f"check_{s.name}" for s in [*elementwise, *reductions]]
    parts = [row_source] + [elementwise_check(s) for s in elementwise] + [reduction_check(s) for s in reductions]
    parts.append("void* instantiated[] = {" + ", ".join(f"(void*)&{n}<{t}>" for n in names for t in ("float", "double")) + "};")
    return "\n".join(parts)


def nvcc_compile(source: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "kernels.cu"
    path.write_text(source)
    return subprocess.run([_NVCC, "-c", "-x", "cu", "-o", str(tmp_path / "kernels.o"), str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def _sources(kind):
    return [obj for obj in vars(ck).values() if isinstance(obj, kind)]


def test_every_elementwise_and_reduction_source_is_listed():
    assert {s.name for s in _sources(ck.ElementwiseSource)} == {"gelu_forward", "gelu_backward", "cross_entropy_backward",
                                                                 "adamw_step", "swiglu_forward", "swiglu_backward"}
    assert {s.name for s in _sources(ck.ReductionSource)} == {"layer_norm_grad_scale"}


@needs_nvcc
def test_every_kernel_source_compiles_with_nvcc_for_float_and_double(tmp_path):
    source = compile_check_source(ck.ROW_KERNEL_SOURCE, ck.ROW_KERNEL_NAMES, _sources(ck.ElementwiseSource),
                                  _sources(ck.ReductionSource))
    result = nvcc_compile(source, tmp_path)
    assert result.returncode == 0, result.stderr


WRONG_SOURCES = {  # (row source, row kernel names, elementwise sources), and the name nvcc must complain about
    "an elementwise body using an undefined name": (
        "", [], [ck.ElementwiseSource("T x", "T y", "y = x * undefined_scale;", "wrong")], "undefined_scale"),
    # nvcc accepts this template as long as nothing instantiates it
    "a row kernel that only breaks when instantiated": (
        "template <typename T>\n__global__ void wrong_row(T* x) { x[0] = T::no_such_member; }\n", ["wrong_row"], [],
        "no_such_member"),
}


@needs_nvcc
@pytest.mark.parametrize("case", WRONG_SOURCES)
def test_compile_check_fails_on_a_wrong_kernel(tmp_path, case):
    row_source, row_names, elementwise, culprit = WRONG_SOURCES[case]
    result = nvcc_compile(compile_check_source(row_source, row_names, elementwise, []), tmp_path)
    assert result.returncode != 0 and culprit in result.stderr


# ============================================================================ on a GPU

_cuda_ok, _cuda_reason = backend.cuda_available()
needs_cuda = pytest.mark.skipif(not _cuda_ok, reason=f"CUDA kernels need CuPy and a GPU: {_cuda_reason}")
DTYPES = [np.float32, np.float64]


def _gpu(a):
    return backend.to_device(a, "cuda")


def _randn(shape, dtype, seed=0, scale=1.0):
    return np.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (7, 33), (3, 5, 129)])
def test_gelu_kernels_match_numpy(dtype, shape):
    x, g = _randn(shape, dtype, 1, scale=3.0), _randn(shape, dtype, 2)
    ref = NumpyKernels()
    np.testing.assert_allclose(host(ck.gelu_forward(_gpu(x))), ref.gelu_forward(x), **_tol(dtype))
    np.testing.assert_allclose(host(ck.gelu_backward(_gpu(x), _gpu(g))), ref.gelu_backward(x, g), **_tol(dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c", [(1, 1), (3, 31), (5, 33), (2, 769), (4, 2048)])
def test_layer_norm_kernels_match_numpy(dtype, n, c):
    x, scale, shift, g = _randn((n, c), dtype, 1), _randn(c, dtype, 2), _randn(c, dtype, 3), _randn((n, c), dtype, 4)
    ref = NumpyKernels()
    outs = ck.layer_norm_forward(_gpu(x), _gpu(scale), _gpu(shift), 1e-5)
    for ours, theirs in zip(outs, ref.layer_norm_forward(x, scale, shift, 1e-5)):
        assert ours.shape == theirs.shape and ours.dtype == dtype
        np.testing.assert_allclose(host(ours), theirs, **_tol(dtype))
    xhat, rstd = ref.layer_norm_forward(x, scale, shift, 1e-5)[1:]
    grads = ck.layer_norm_backward(_gpu(g), _gpu(xhat), _gpu(rstd), _gpu(scale))
    for ours, theirs in zip(grads, ref.layer_norm_backward(g, xhat, rstd, scale)):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(host(ours), theirs, **_tol(dtype, factor=10))  # sums of n rows of products


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, tq, tk", [((), 1, 1), ((2,), 3, 3), ((2, 3), 4, 9), ((1, 2), 5, 300), ((1,), 2, 1025)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_softmax_kernels_match_numpy(dtype, lead, tq, tk, causal):
    scores, dp = _randn((*lead, tq, tk), dtype, 1, scale=4.0), _randn((*lead, tq, tk), dtype, 2)
    ref = NumpyKernels()
    p = _gpu(scores)
    ck.attention_softmax_(p, 0.125, causal)
    expected = scores.copy()
    ref.attention_softmax_(expected, 0.125, causal)
    np.testing.assert_allclose(host(p), expected, **_tol(dtype))
    dp_gpu = _gpu(dp)
    ck.softmax_backward_(dp_gpu, _gpu(expected), 0.125)
    ref.softmax_backward_(dp, expected, 0.125)
    np.testing.assert_allclose(host(dp_gpu), dp, **_tol(dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v", [(1, 1), (3, 37), (4, 50257)])
def test_logsumexp_and_cross_entropy_backward_kernels_match_numpy(dtype, n, v):
    z = _randn((n, v), dtype, 1, scale=3.0) + np.asarray(1e4, dtype)  # large logits: the max shift must work
    t = np.random.default_rng(2).integers(0, v, size=n)
    weight = np.where(np.arange(n) % 2 == 0, 0.25, 0.0).astype(dtype)[:, None]  # odd rows ignored
    ref = NumpyKernels()
    lse = ck.logsumexp_rows(_gpu(z))
    lse_ref = ref.logsumexp_rows(z)
    ulp = np.spacing(dtype(1e4))  # lse is near 1e4: allow a few units in its last place
    np.testing.assert_allclose(host(lse), lse_ref, rtol=0, atol=4 * ulp if dtype == np.float32 else 1e-9)
    for targets in (t, t.astype(np.int32)):
        dz = ck.cross_entropy_backward(_gpu(z), _gpu(lse_ref), _gpu(targets), _gpu(weight))
        np.testing.assert_allclose(host(dz), ref.cross_entropy_backward(z, lse_ref, t, weight), **_tol(dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_adamw_kernel_matches_numpy_in_place_on_contiguous_and_strided_arrays(dtype, transposed):
    shape = (33, 65)
    w, g = _randn(shape, dtype, 1), _randn(shape, dtype, 2)
    m, v = _randn(shape, dtype, 3) * 0.1, np.abs(_randn(shape, dtype, 4)) * 0.01
    arrays = [_gpu(a.T.copy()).T if transposed else _gpu(a) for a in (w, g, m, v)]
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
             "step_size": 1e-2 / (1 - 0.9**3), "rsqrt_correction": 1 / math.sqrt(1 - 0.95**3)}
    ck.adamw_step_(*arrays, **hyper)
    NumpyKernels().adamw_step_(w, g, m, v, **hyper)
    for ours, theirs in zip(arrays, (w, g, m, v)):
        np.testing.assert_allclose(host(ours), theirs, **_tol(dtype))


@needs_cuda
def test_in_place_kernels_refuse_arrays_that_are_not_contiguous():
    p = _gpu(np.ones((4, 6)))[:, :3]
    with pytest.raises(ValueError, match="C-contiguous"):
        ck.attention_softmax_(p, 1.0, False)
    with pytest.raises(ValueError, match="C-contiguous"):
        ck.softmax_backward_(p, p.copy(), 1.0)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, overrides, examples",
                         [pytest.param(case, overrides, examples, id=test_id)
                          for case in CASES for test_id, overrides, examples in case.variants()])
def test_cuda_kernels_match_the_plain_math_on_the_gpu(mode, case, overrides, examples, dtype):
    for seed, pinned in list(enumerate(examples)) + [(100 + seed, overrides) for seed in range(SEEDS_PER_CASE)]:
        built = case.run(FixedPicker(np.random.default_rng(seed), pinned))
        with backend.get_backend("cuda").full_precision():
            plain, fast = _plain_and_fast(built.fn, _inputs_on_host(built), dtype, device="cuda")
        for name, a, b in zip(["output"] + [f"grad {i}" for i in range(len(built.inputs))], fast, plain):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{case.name} {built.description}: {name}"
            np.testing.assert_allclose(a, b, **_tol(dtype, factor=10), err_msg=f"{case.name} {built.description}: {name}")


@needs_cuda
def test_kernel_ops_grads_match_finite_differences_on_rows_longer_than_a_warp():
    """Rows of 70 values: several warps per block, so block_reduce combines warps."""
    gen = np.random.default_rng(0)

    def leaf(*shape):
        return tg.tensor(gen.standard_normal(shape), requires_grad=True, device="cuda")

    targets = _gpu(np.array([5, -100, 69]))
    checks = [
        (lambda x, s, b: F.layer_norm(x, s, b), [leaf(3, 70), leaf(70), leaf(70)]),
        (F.gelu, [leaf(3, 70)]),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True), [leaf(1, 3, 2), leaf(1, 70, 2), leaf(1, 70, 2)]),
        (lambda z: F.cross_entropy(z, targets), [leaf(3, 70)]),
    ]
    for fn, inputs in checks:
        assert tg.gradcheck(fn, inputs, raise_exception=True)


@needs_cuda
def test_tf32_is_opt_in_and_full_precision_restores_the_previous_setting():
    import cupy
    from cupy._core import _routines_linalg as linalg

    ampere = int(cupy.cuda.Device().compute_capability) >= 80
    cuda = backend.get_backend("cuda")
    with cuda.full_precision():  # leaves the process as it found it
        assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT
        with warnings.catch_warnings():  # before Ampere CuPy warns and stays in float32
            warnings.simplefilter("ignore")
            cuda.allow_tf32(True)
        enabled = linalg.get_compute_type(np.float32)
        assert enabled == (linalg.COMPUTE_TYPE_TF32 if ampere else linalg.COMPUTE_TYPE_DEFAULT)
        with cuda.full_precision():
            assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT
            a, b = _randn((64, 64), np.float32, 1), _randn((64, 64), np.float32, 2)
            np.testing.assert_allclose(host(_gpu(a) @ _gpu(b)), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
        assert linalg.get_compute_type(np.float32) == enabled
        cuda.allow_tf32(False)
        assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT
        assert linalg.get_compute_type(np.float64) != linalg.COMPUTE_TYPE_TF32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_swiglu_at_huge_inputs_is_finite_silent_and_equals_the_plain_op(mode, dtype):
    """The fast sigmoid lets exp(-a) overflow to inf for very negative a (1 / inf = 0, the right
    limit); no warning may escape and nothing may differ from the plain op's overflow-free form."""
    a = np.array([[-1e4, -800.0, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 800.0, 1e4]])
    b = np.linspace(-2.0, 2.0, a.size).reshape(a.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain, fast = _plain_and_fast(F.swiglu, [a, b], dtype)
    for x, y in zip(fast, plain):
        assert np.isfinite(x).all()
        np.testing.assert_allclose(x, y, **_tol(dtype))
