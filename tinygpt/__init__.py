"""tinygpt: a GPT you can read, on a NumPy/CuPy engine with hand-written gradients."""
from tinygpt.backend import (default_device, default_dtype, get_rng_state, manual_seed, set_default_device,
                             set_default_dtype, set_rng_state)
from tinygpt.gradcheck import gradcheck, gradcheck_report
from tinygpt.dispatch import kernels_mode, set_kernels
from tinygpt.tensor import Function, Tensor, cat, is_grad_enabled, no_grad, where
from tinygpt.creation import ones, randn, tensor, zeros
from tinygpt import functional  # noqa: E402  (import order: functional builds on tensor)
from tinygpt.kernels import fused  # noqa: E402, F401  (registers the fast versions of the ops with dispatch)
from tinygpt.trace import detect_anomaly, trace  # noqa: E402
from tinygpt.compare import compare  # noqa: E402  (layer by layer against transformers; torch imported on use)

__version__ = "0.1.0"

__all__ = ["Tensor", "Function", "tensor", "zeros", "ones", "randn", "cat", "where", "no_grad", "is_grad_enabled",
           "manual_seed", "set_default_device", "set_default_dtype", "default_device", "default_dtype",
           "get_rng_state", "set_rng_state", "gradcheck", "gradcheck_report", "functional", "trace", "detect_anomaly",
           "set_kernels", "kernels_mode", "compare"]
