"""The per-block EMAs of the step around the preconditioner: the β₁-filtered gradient before it
and heavy-ball / Nesterov momentum after it, both leaving skipped blocks exactly unchanged."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .preconditioners import Context
from .preconditioners.base import ema_, per_block

__all__ = ["ds_momentum_", "filter_description", "filtered_gradient", "momentum_", "torch_momentum_"]


def filtered_gradient(opt: dict, grad: Tensor, ctx: Context, group: dict[str, Any]) -> Tensor:
    """β₁-EMA of the gradient (``beta3`` for the current step, divided by
    ``ctx.bias_correction1``, see ``filter_description``), or the gradient."""
    beta1 = group["betas"][0]
    if beta1 == 0.0:
        return grad
    beta3 = beta1 if group["beta3"] < 0 else group["beta3"]
    buffer = opt.setdefault("filtered_grad", torch.zeros_like(grad))
    current = None
    if beta3 != beta1:
        current = buffer.lerp(grad, per_block(ctx.live, grad.ndim) * (1.0 - beta3))
    ema_(buffer, grad, beta1, ctx.live)
    filtered = buffer if current is None else current
    if group["use_bias_correction"]:
        filtered = filtered / ctx.bias_correction1
    return filtered


def momentum_(opt: dict, direction: Tensor, ok: Tensor, group: dict[str, Any], step: int) -> Tensor:
    """Heavy-ball / Nesterov momentum: Distributed Shampoo's (``ds_momentum_``), or with the group
    option ``use_torch_momentum`` ``torch.optim.SGD``'s (``torch_momentum_``); they differ only
    with dampening. ``direction`` is zero on dead blocks (``ok`` false), whose buffer stays
    unchanged. In place."""
    if group.get("use_torch_momentum", False):
        return torch_momentum_(opt, direction, ok, group, step)
    return ds_momentum_(opt, direction, ok, group)


# ---- Distributed Shampoo's momentum (ClassicMomentumConfig): a separate hunk to port as is.
def ds_momentum_(opt: dict, direction: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
    """``M ← μM + (1−d)P`` from a zero buffer (the first step is damped too); the direction
    becomes ``M``, or with Nesterov ``(1−d)P + μM`` (dampening allowed). On dead blocks ``M``
    keeps its value (``P`` is zero there and the decay factor is 1)."""
    mu, dampening = group["momentum"], group["dampening"]
    buffer = opt.get("momentum_buffer")
    if buffer is None:
        buffer = opt["momentum_buffer"] = torch.zeros_like(direction)
    keep = 1.0 - (1.0 - mu) * ok.to(direction.dtype)  # μ on live blocks, 1 on dead ones
    buffer.mul_(per_block(keep, direction.ndim)).add_(direction, alpha=1.0 - dampening)
    if group["use_nesterov"]:
        return direction.mul_(1.0 - dampening).add_(buffer, alpha=mu)
    return direction.copy_(buffer)


# ---- torch.optim.SGD's momentum (the drop-in translation of SGD selects it).
def torch_momentum_(opt: dict, direction: Tensor, ok: Tensor, group: dict[str, Any], step: int) -> Tensor:
    """Heavy-ball / Nesterov momentum as ``torch.optim.SGD`` (first step: buffer = direction)."""
    mu = group["momentum"]
    if "momentum_buffer" not in opt:
        opt["momentum_buffer"] = direction.clone()
        opt["momentum_started"] = ok.clone()
    else:
        keep = 1.0 - (1.0 - mu) * ok.to(direction.dtype)  # μ on live blocks, 1 on dead ones
        buffer = opt["momentum_buffer"].mul_(per_block(keep, direction.ndim))
        dampening = group["dampening"]
        started = opt.setdefault("momentum_started", torch.ones_like(ok))
        if dampening == 0.0:
            buffer.add_(direction, alpha=1.0)
        else:  # a block's first live step starts its (zero) buffer undamped, as torch.optim.SGD
            weight = 1.0 - dampening * started.to(direction.dtype)  # in float64 too (not via float32)
            buffer.add_(direction * per_block(weight, direction.ndim))
        started |= ok
    buffer = opt["momentum_buffer"]
    if group["use_nesterov"]:
        return direction.add_(buffer, alpha=mu)
    return direction.copy_(buffer)


def filter_description(group: dict[str, Any], step: int) -> dict[str, Any]:
    """``Context.beta1`` / ``bias_correction1``: how the filtered gradient follows the gradients."""
    beta1 = group["betas"][0]
    beta3 = beta1 if group["beta3"] < 0 else group["beta3"]
    correction = 1.0 - beta3 * beta1 ** (step - 1) if group["use_bias_correction"] else 1.0
    return {"beta1": beta1 if beta3 == beta1 else None, "bias_correction1": correction}
