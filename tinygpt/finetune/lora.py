"""Low-rank adaptation (book appendix E; Hu et al., 2021).

Instead of updating a frozen weight W (out x in), learn a low-rank change: the layer computes
    y = x W^T + b + (alpha / rank) * x A B,   A: (in, rank), B: (rank, out)
A starts random and B at zero, so training starts from exactly the pretrained model, and
only rank * (in + out) numbers per layer are trained instead of in * out.
"""
from __future__ import annotations

import math

from tinygpt import backend, nn
from tinygpt.creation import zeros
from tinygpt.tensor import Tensor


class LoRALayer(nn.Module):
    """x -> (alpha / rank) * x A B."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        # PyTorch's kaiming_uniform_(A, a=sqrt(5)), as in the book: fan_in = rank, bound 1/sqrt(rank)
        self.A = nn.uniform_parameter((in_dim, rank), 1.0 / math.sqrt(rank))
        self.B = nn.Parameter(zeros(rank, out_dim))
        self.rank, self.alpha = rank, alpha

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A @ self.B) * (self.alpha / self.rank)  # [..., in] -> [..., rank] -> [..., out]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LinearWithLoRA(nn.Module):
    """A frozen Linear plus a trainable LoRALayer beside it."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze every parameter of `model`, then wrap every Linear in a LinearWithLoRA (in place).
    Afterwards only the LoRA matrices train: `model.num_parameters(trainable_only=True)`.
    A GPTModel notes {"rank", "alpha"} under cfg["lora"], so a checkpoint of it reloads
    with the same adapters."""
    model.requires_grad_(False)
    _wrap(model, rank, alpha)
    if isinstance(getattr(model, "cfg", None), dict):
        model.cfg["lora"] = {"rank": rank, "alpha": alpha}
    return model


def _wrap(module: nn.Module, rank: int, alpha: float) -> None:
    for name, child in list(vars(module).items()):
        if isinstance(child, nn.Linear):
            with backend.device_scope(child.weight.device):
                setattr(module, name, LinearWithLoRA(child, rank, alpha))
        elif isinstance(child, nn.Module) and not isinstance(child, LinearWithLoRA):
            _wrap(child, rank, alpha)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its weight, W <- W + (alpha / rank) (A B)^T, and put the plain
    Linear back: the same outputs without the extra matrix products at inference time."""
    if isinstance(getattr(model, "cfg", None), dict):
        model.cfg.pop("lora", None)
    for name, child in list(vars(model).items()):
        if isinstance(child, LinearWithLoRA):
            lora, linear = child.lora, child.linear
            delta = (lora.A.data @ lora.B.data).T * (lora.alpha / lora.rank)  # [in, out] -> [out, in]
            linear.weight.data = linear.weight.data + delta.astype(linear.weight.dtype)
            setattr(model, name, linear)
        elif isinstance(child, nn.Module):
            merge_lora(child)
    return model
