"""Shared fixtures: every test that takes `device` runs on NumPy ("cpu"), on the strict
CuPy-like backend ("strict") and, when CuPy and a GPU are present, on CUDA."""
from pathlib import Path

import numpy as np
import pytest

import tinygpt as tg
from tinygpt import backend

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_cuda_ok, _cuda_reason = backend.cuda_available()


@pytest.fixture(params=["cpu", "strict", "cuda"])
def device(request):
    """Run the test with this device as the default, float32, a fixed seed."""
    if request.param == "cuda" and not _cuda_ok:
        pytest.skip(f"CUDA backend not available: {_cuda_reason}")
    previous = tg.default_device()
    tg.set_default_device(request.param)
    tg.manual_seed(0)
    yield request.param
    tg.set_default_device(previous)


@pytest.fixture(autouse=True)
def _restore_defaults():
    """Tests that change the default dtype or device leave no trace."""
    dtype, dev = tg.default_dtype(), tg.default_device()
    yield
    tg.set_default_dtype(dtype)
    tg.set_default_device(dev)


def host(x):
    """A NumPy copy of a Tensor or backend array, for comparing in tests."""
    if isinstance(x, tg.Tensor):
        return x.numpy()
    return backend.to_host(x) if backend.is_array(x) and not isinstance(x, np.ndarray) else np.asarray(x)
