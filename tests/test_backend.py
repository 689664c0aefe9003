"""Backends: defaults, seeds, host/device moves, and the strict backend's refusals."""
import numpy as np
import pytest

import tinygpt as tg
from tinygpt import backend
from tinygpt.strict import StrictArray
from conftest import host


def test_default_dtype_is_float32_and_can_be_float64(device):
    assert tg.tensor([1.5]).dtype == np.float32
    assert tg.tensor(np.arange(3.0)).dtype == np.float32  # float64 host data follows the default
    assert tg.tensor([1, 2]).dtype.kind == "i"  # integers keep their kind
    tg.set_default_dtype(np.float64)
    assert tg.randn(2).dtype == np.float64 and tg.zeros(2).dtype == np.float64


def test_set_default_dtype_rejects_other_types():
    with pytest.raises(ValueError, match="int32"):
        tg.set_default_dtype(np.int32)


def test_scalar_arithmetic_keeps_float32(device):
    x = tg.randn(3)
    for y in (x * 2.5, x + np.float64(1.0), x / 3, 1.0 - x, x**2):
        assert y.dtype == np.float32


def test_manual_seed_makes_random_tensors_repeat(device):
    tg.manual_seed(123)
    a = host(tg.randn(4, 5))
    tg.manual_seed(123)
    b = host(tg.randn(4, 5))
    c = host(tg.randn(4, 5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)


def test_same_seed_gives_same_numbers_on_every_device():
    tg.manual_seed(7)
    cpu = tg.randn(3, 4, device="cpu").numpy()
    tg.manual_seed(7)
    strict = tg.randn(3, 4, device="strict").numpy()
    np.testing.assert_array_equal(cpu, strict)


def test_rng_state_round_trip_resumes_the_stream(device):
    tg.manual_seed(5)
    tg.randn(3)
    state = tg.get_rng_state()
    expected = host(tg.randn(3))
    tg.manual_seed(99)
    tg.set_rng_state(state)
    np.testing.assert_array_equal(host(tg.randn(3)), expected)


def test_tensor_copies_its_input():
    source = np.ones(3, dtype=np.float32)
    t = tg.tensor(source)
    source[0] = 5.0
    assert t.numpy()[0] == 1.0


def test_numpy_and_item_are_host_values(device):
    t = tg.tensor([[2.5]])
    assert isinstance(t.numpy(), np.ndarray)
    assert t.item() == 2.5
    with pytest.raises(ValueError, match=r"\(2,\)"):
        tg.tensor([1.0, 2.0]).item()


def test_mixing_devices_names_both():
    a = tg.randn(2, device="cpu")
    b = tg.randn(2, device="strict")
    with pytest.raises(RuntimeError, match="cpu and strict"):
        a + b


def test_cuda_request_without_cupy_or_gpu_says_what_is_missing():
    ok, reason = backend.cuda_available()
    if ok:
        pytest.skip("a GPU is present: the error path cannot be exercised")
    with pytest.raises(RuntimeError) as info:
        tg.set_default_device("cuda")
    message = str(info.value)
    assert "CuPy" in message and ("cuda12" in message or "GPU" in message)


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="tpu"):
        tg.set_default_device("tpu")


def test_strict_array_refuses_implicit_conversion_to_numpy():
    x = tg.randn(3, device="strict").data
    assert isinstance(x, StrictArray)
    with pytest.raises(TypeError, match="implicit conversion"):
        np.asarray(x)


def test_strict_array_refuses_mixing_with_numpy_arrays():
    x = tg.randn(3, device="strict").data
    with pytest.raises(TypeError, match="raw numpy"):
        x + np.ones(3)
    with pytest.raises(TypeError, match="raw numpy"):
        np.ones(3) * x
    with pytest.raises(TypeError, match="raw numpy"):
        backend.get_backend("strict").xp.maximum(x, np.zeros(3))


def test_strict_array_allows_scalars_and_explicit_moves():
    xp = backend.get_backend("strict").xp
    x = xp.asarray(np.arange(3.0))  # the explicit host -> device door
    y = x * 2.0 + np.float32(1.0)
    assert isinstance(y, StrictArray)
    np.testing.assert_array_equal(y.get(), [1.0, 3.0, 5.0])
    assert isinstance(x.sum(), StrictArray)  # reductions stay on the device, as with CuPy
    assert float(x.sum()) == 3.0


def test_strict_backend_catches_numpy_call_on_device_data():
    x = tg.randn(3, device="strict")
    with pytest.raises(TypeError):
        np.asarray(x.data) + 1
