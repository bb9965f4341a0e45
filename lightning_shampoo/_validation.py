"""Construction-time checks of a param group: every bad value raises ``ValueError`` naming it."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .compat import translate_group
from .preconditioners import GRAFTING_CONFIGS, PreconditionerConfig, PSGDKronPreconditionerConfig

__all__ = ["validate_group"]


def _is_int_or_inf(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or value == math.inf


def _pseudo_inverse(config: Any) -> bool:
    return bool(getattr(getattr(config, "amortized_computation_config", None), "pseudo_inverse", False))


def validate_group(group: dict[str, Any]) -> None:
    """Validate ``group`` in place (resolving ``start_preconditioning_step=-1`` and translating
    Distributed Shampoo's newer names, ``compat.translate_group``)."""
    translate_group(group)
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a float or a one-element tensor, got shape {tuple(lr.shape)}")
    elif not (isinstance(lr, int | float) and lr >= 0.0):
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    betas = group["betas"]
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    group["betas"] = beta1, beta2 = float(betas[0]), float(betas[1])
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"betas[0] must be in [0, 1), got {beta1}")
    if not 0.0 < beta2 <= 1.0:
        raise ValueError(f"betas[1] must be in (0, 1], got {beta2}")
    beta3 = group["beta3"]
    if beta3 != -1.0 and not 0.0 <= beta3 < 1.0:
        raise ValueError(f"beta3 must be -1 (use betas[0]) or in [0, 1), got {beta3}")
    config = group["preconditioner_config"]
    if not isinstance(config, PreconditionerConfig):
        raise ValueError(
            f"preconditioner_config must be a preconditioner config instance, got {type(config).__name__}"
        )
    if isinstance(config, PSGDKronPreconditionerConfig) and not config.whiten_grad and beta1 == 0.0:
        raise ValueError(
            "PSGDKronPreconditionerConfig(whiten_grad=False) fits the preconditioner on the momentum, "
            "which needs betas[0] > 0; got betas[0] = 0.0 (set betas[0] or use whiten_grad=True)"
        )
    epsilon = group["epsilon"]
    if _pseudo_inverse(config):
        if not epsilon >= 0.0:
            raise ValueError(f"epsilon must be >= 0 with pseudo_inverse, got {epsilon}")
    elif not epsilon > 0.0:
        raise ValueError(f"epsilon must be > 0 (or use pseudo_inverse=True), got {epsilon}")
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
    if not 0.0 <= group["dampening"] < 1.0:
        raise ValueError(f"dampening must be in [0, 1), got {group['dampening']}")
    if group["use_nesterov"] and group["momentum"] == 0.0:
        raise ValueError("use_nesterov requires momentum > 0")
    if group["use_nesterov"] and group.get("use_torch_momentum") and group["dampening"] != 0.0:
        raise ValueError("use_nesterov with use_torch_momentum requires dampening = 0, as torch.optim.SGD")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    max_dim = group["max_preconditioner_dim"]
    if not (_is_int_or_inf(max_dim) and max_dim >= 1):
        raise ValueError(f"max_preconditioner_dim must be an int >= 1 or math.inf, got {max_dim!r}")
    frequency = group["precondition_frequency"]
    if not (isinstance(frequency, int) and not isinstance(frequency, bool) and frequency >= 1):
        raise ValueError(f"precondition_frequency must be an int >= 1, got {frequency!r}")
    start = group["start_preconditioning_step"]
    if start == -1:
        group["start_preconditioning_step"] = start = frequency
    if not _is_int_or_inf(start):
        raise ValueError(f"start_preconditioning_step must be an int, math.inf or -1, got {start!r}")
    if start < frequency:
        raise ValueError(
            f"start_preconditioning_step ({start}) must be >= precondition_frequency ({frequency}) or -1"
        )
    tolerance = group.get("refresh_tolerance")
    if tolerance is not None and not (isinstance(tolerance, int | float) and tolerance >= 0):
        raise ValueError(f"refresh_tolerance must be None or >= 0, got {tolerance!r}")
    graft = group["grafting_config"]
    if graft is not None and not isinstance(graft, GRAFTING_CONFIGS):
        raise ValueError(
            "grafting_config must be None or one of "
            f"{[c.__name__ for c in GRAFTING_CONFIGS]}, got {type(graft).__name__}"
        )
    skip = group.get("skip_preconditioning_rank_lt", 0)
    if not (isinstance(skip, int) and not isinstance(skip, bool) and skip >= 0):
        raise ValueError(f"skip_preconditioning_rank_lt must be an int >= 0, got {skip!r}")
    if skip > 0 and graft is None:
        raise ValueError(
            "skip_preconditioning_rank_lt > 0 needs a grafting_config: it steps the skipped parameters"
        )
    for key in (
        "use_bias_correction",
        "use_decoupled_weight_decay",
        "use_nesterov",
        "use_merge_dims",
        "stacked",
        "use_torch_momentum",
    ):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be a bool, got {group[key]!r}")
