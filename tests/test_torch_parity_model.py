"""Parity of the whole GPTModel with the book's PyTorch GPT (chapters 3-4).

The reference below is the book's code, names included, so tinygpt's state_dict loads into it
key for key. Both models get the same weights and tokens; with dropout off (eval) the logits
and the gradient of the cross-entropy loss for every parameter must agree.

Tolerances. float32: logits rtol 1e-5, gradients rtol 1e-4; float64: rtol 1e-10. Each atol is
a small multiple of the largest |value| of the array compared (2e-6 of it in float32, about 16
ulps; 1e-12 in float64): an entry near zero comes out of cancelling terms as large as that
maximum, and its rounding error is set by those terms, not by its own size. Without that, a
logit of 1e-7 would be held to a relative 1e-5 that no two float32 matmul libraries can promise.
Measured here (NumPy/OpenBLAS against torch CPU), the largest error is below 1e-6 of the
maximum in float32 and about 2e-15 of it in float64. The one exception is the gradient of a
key bias, which is exactly zero (see the test), so only its smallness is checked.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import host

import tinygpt as tg
import tinygpt.functional as F
from tinygpt.model import GPTModel

torch = pytest.importorskip("torch", reason="PyTorch not installed: parity tests skipped")
tnn = torch.nn

CFG = {"vocab_size": 61, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": False}
TOLERANCES = {  # dtype: (logits rtol, gradient rtol, atol as a fraction of max |value|)
    np.dtype(np.float32): (1e-5, 1e-4, 2e-6),
    np.dtype(np.float64): (1e-10, 1e-10, 1e-12),
}


# ------------------------------------------------------------------ the book's PyTorch GPT

# The reference lives in benchmarks/torch_gpt.py, which the training-step benchmark runs too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_gpt import TorchGPTModel  # noqa: E402


# ------------------------------------------------------------------ helpers


def twin_models(cfg: dict, dtype) -> tuple[GPTModel, TorchGPTModel]:
    """A tinygpt model with O(1) logits (weights ~ N(0, 0.1), LayerNorms perturbed around 1 and 0)
    and the book's torch model holding the same weights, both in `dtype` and in eval mode."""
    tg.set_default_dtype(dtype)
    tg.manual_seed(0)
    model = GPTModel(cfg).eval()
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters():
        values = rng.standard_normal(p.shape) * 0.1 + (1.0 if name.endswith(".scale") else 0.0)
        p.data = tg.tensor(values, dtype=dtype).data
    reference = TorchGPTModel(cfg).to(torch.float64 if dtype == np.float64 else torch.float32).eval()
    result = reference.load_state_dict({k: torch.from_numpy(host(v)) for k, v in model.state_dict().items()},
                                       strict=False)
    assert result.unexpected_keys == []
    assert all(k.endswith(".att.mask") for k in result.missing_keys), result.missing_keys  # buffers, not parameters
    return model, reference


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, atol_fraction: float, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: tinygpt dtype {actual.dtype}, torch dtype {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: tinygpt shape {actual.shape}, torch shape {expected.shape}"
    atol = atol_fraction * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


VARIANTS = [
    pytest.param({}, id="plain"),
    pytest.param({"qkv_bias": True}, id="qkv_bias"),
    pytest.param({"tie_weights": True}, id="tied"),
    pytest.param({"qkv_bias": True, "tie_weights": True}, id="qkv_bias-tied"),
]
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


# ------------------------------------------------------------------ tests


def test_reference_has_exactly_tinygpts_parameter_names_and_shapes():
    for variant in ({}, {"qkv_bias": True}):
        cfg = {**CFG, **variant}
        model, reference = GPTModel(cfg), TorchGPTModel(cfg)
        ours = {k: v.shape for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in reference.named_parameters()}
        assert ours == theirs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", [16, 11], ids=["full-context", "shorter"])
def test_logits_and_every_parameter_gradient_match_the_books_pytorch_gpt(variant, dtype, tokens):
    cfg = {**CFG, **variant}
    model, reference = twin_models(cfg, dtype)
    rng = np.random.default_rng(2)
    x = rng.integers(0, cfg["vocab_size"], (3, tokens))
    y = rng.integers(0, cfg["vocab_size"], (3, tokens))
    logits_rtol, grad_rtol, atol_fraction = TOLERANCES[np.dtype(dtype)]

    logits = model(x)
    reference_logits = reference(torch.from_numpy(x))
    expected = reference_logits.detach().numpy()
    assert np.abs(expected).max() > 0.5  # O(1) logits: the comparison is not of near-zeros
    assert_close(host(logits), expected, logits_rtol, atol_fraction, "logits")

    loss = F.cross_entropy(logits, y)
    reference_loss = torch.nn.functional.cross_entropy(reference_logits.flatten(0, 1), torch.from_numpy(y).flatten())
    np.testing.assert_allclose(loss.item(), reference_loss.item(), rtol=logits_rtol)
    loss.backward()
    reference_loss.backward()
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        grad, reference_grad = host(p.grad), reference_params[name].grad.numpy()
        if name.endswith("att.W_key.bias"):
            # A key bias b adds q.b to every score of a query's row, and softmax ignores a
            # constant per row, so dL/db is exactly 0: both sides hold rounding noise only,
            # which must be small next to the key weights' gradient.
            noise = atol_fraction * np.abs(host(model.trf_blocks[int(name.split(".")[1])].att.W_key.weight.grad)).max()
            assert np.abs(grad).max() <= noise and np.abs(reference_grad).max() <= noise, name
            continue
        assert_close(grad, reference_grad, grad_rtol, atol_fraction, f"gradient of {name}")
    if cfg.get("tie_weights"):
        assert model.out_head.weight is model.tok_emb.weight
        assert reference.out_head.weight is reference.tok_emb.weight
