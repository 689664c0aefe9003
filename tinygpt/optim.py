"""Optimisers and their helpers: AdamW, global-norm gradient clipping, warmup + cosine
learning-rate schedule (book chapter 5 and appendix D)."""
from __future__ import annotations

import math
from typing import Iterable

from tinygpt import backend, dispatch
from tinygpt.backend import backend_of
from tinygpt.tensor import Tensor, no_grad


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as torch.optim.AdamW.

    For each parameter p with gradient g, at step t:
        p <- p * (1 - lr * weight_decay)                  decay, separate from the gradient
        m <- b1 m + (1 - b1) g                            running mean of g
        v <- b2 v + (1 - b2) g^2                          running mean of g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
    m and v start at 0, so early on they underestimate; dividing by (1 - b^t) corrects that.

    `params` is a list of parameters or of groups, dicts with "params" and any of lr, betas,
    eps, weight_decay: e.g. biases and LayerNorm parameters with weight_decay 0.
    Updates are in place, so the arrays never change identity."""

    def __init__(self, params: Iterable, lr: float = 4e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):  # NaN fails too
            raise ValueError(f"AdamW: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        if hasattr(params, "parameters"):
            raise TypeError(f"AdamW takes the parameters, not the {type(params).__name__}: AdamW(model.parameters())")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]
        if not self.parameters():
            raise ValueError("AdamW got an empty parameter list: there is nothing to update (are all parameters frozen?)")
        self.state: dict[int, dict] = {}  # id(param) -> {"step", "m", "v"}

    def parameters(self) -> list[Tensor]:
        """Every parameter this optimizer updates, in group order."""
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    @no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(id(p))
                if state is None:
                    xp = backend_of(p.data)
                    state = self.state[id(p)] = {"step": 0, "m": xp.zeros_like(p.data), "v": xp.zeros_like(p.data)}
                state["step"] += 1
                t = state["step"]
                rule = {"lr": lr, "beta1": b1, "beta2": b2, "eps": eps, "weight_decay": wd,
                        "step_size": lr / (1.0 - b1**t), "rsqrt_correction": 1.0 / math.sqrt(1.0 - b2**t)}
                update = dispatch.implementation(adamw_step_, p.data)  # the plain update below, or the device's fast one
                update(p.data, p.grad.data, state["m"], state["v"], **rule)

    def state_dict(self) -> dict:
        """Hyperparameters and per-parameter state, parameters named by their position."""
        index = {id(p): i for i, p in enumerate(self.parameters())}
        return {
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                             for g in self.param_groups],
            "state": {index[pid]: dict(s) for pid, s in self.state.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        params = self.parameters()
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"AdamW.load_state_dict: group sizes {[len(g['params']) for g in groups]} do not match "
                             f"this optimizer's {[len(g['params']) for g in self.param_groups]}")
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            self.state[id(p)] = {"step": int(s["step"]),
                                 "m": backend.make_array(s["m"], dtype=p.dtype, device=p.device),
                                 "v": backend.make_array(s["v"], dtype=p.dtype, device=p.device)}


def adamw_step_(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step_size, rsqrt_correction) -> None:
    """One AdamW update (the rule in AdamW's docstring) in place on the arrays w, m, v, with
    step_size = lr / (1 - b1^t) and rsqrt_correction = 1 / sqrt(1 - b2^t), so that
    lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps) = step_size * m / (sqrt(v) * rsqrt_correction + eps)."""
    w *= 1.0 - lr * weight_decay
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    w -= step_size * m / (backend_of(v).sqrt(v) * rsqrt_correction + eps)


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients together so that their global L2 norm is at most max_norm
    (as torch.nn.utils.clip_grad_norm_). Returns the norm before clipping."""
    if not max_norm > 0:  # NaN fails too
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm}")
    grads = [p.grad.data for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


def warmup_cosine_lr(step: int, total_steps: int, peak_lr: float, warmup_steps: int,
                     initial_lr: float = 3e-5, min_lr: float = 1e-6) -> float:
    """Appendix D's schedule: linear from initial_lr to peak_lr over warmup_steps, then a half
    cosine from peak_lr down to min_lr at total_steps."""
    if step < warmup_steps:
        return initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
