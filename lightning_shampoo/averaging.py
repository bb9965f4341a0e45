"""Iterate averaging: momentum, generalized primal averaging (GPA) and Schedule-Free.

Configs with Distributed Shampoo's names and defaults (its ``iterate_averaging_config``), and the
updates of GPA and Schedule-Free as pure functions over lists of tensors (one entry per block or
parameter; ``torch._foreach`` ops, no Python loop over elements), for the step and for the
train ↔ eval weight swap.

Both methods keep two sequences besides the weights the model holds:

* ``z`` — the base optimizer's own iterates: ``z ← z − lr·P`` with ``P`` the search direction
  (preconditioned, grafted, decayed), evaluated at the model's weights;
* ``x`` — the evaluation sequence, an average of the ``z``: ``x ← μ_x·x + (1 − μ_x)·z``;
* ``y = μ_y·x + (1 − μ_y)·z`` — where gradients are taken, held by the model in train mode.

Only ``y`` (the model's weights, in train mode) and ``z`` (``weight_buffer``) are needed:
``x = (y − (1 − μ_y)·z) / μ_y``. ``train_to_eval`` moves the model's weights from ``y`` to ``x``
(evaluation and checkpoints of the averaged model) and ``eval_to_train`` back, up to rounding;
``Shampoo.eval()`` also saves ``y`` so that its ``train()`` restores it bitwise
(``_averaging_stage``).

GPA (Defazio et al.'s primal averaging generalised with two constants) uses fixed ``μ_x`` and
``μ_y``: ``μ_y = 1`` is heavy-ball momentum and ``μ_y = μ_x`` Nesterov, with ``lr`` scaled by
``1/(1 − μ_x)`` (see ``GeneralizedPrimalAveragingConfig``). Schedule-Free (Defazio et al., "The
Road Less Scheduled") uses ``μ_x = 1 − lr_tᵖ / Σ_{s≤t} lr_sᵖ`` (``p`` = ``eval_coeff_lr_power``,
a uniform average of the ``z`` at a constant ``lr``) and fixed ``μ_y``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ClassicMomentumConfig",
    "GeneralizedPrimalAveragingConfig",
    "IterateAveragingConfig",
    "ScheduleFreeConfig",
    "averaging_step_",
    "eval_to_train_",
    "schedule_free_eval_coefficient",
    "train_to_eval_",
]


@dataclass(frozen=True)
class IterateAveragingConfig:
    """Base class of the ``iterate_averaging_config`` values."""


@dataclass(frozen=True, kw_only=True)
class ClassicMomentumConfig(IterateAveragingConfig):
    """Momentum on the search direction ``P`` (Distributed Shampoo's): ``M ← μM + (1−d)P`` from a
    zero buffer, then ``P ← M``, or with Nesterov ``P ← (1−d)P + μM``. The same as the optimizer's
    ``momentum`` / ``dampening`` / ``use_nesterov`` group options, which it sets."""

    momentum: float = 0.5
    dampening: float = 0.0
    use_nesterov: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(
                f"momentum must be in (0, 1), got {self.momentum} "
                "(for no momentum: iterate_averaging_config=None)"
            )
        if not 0.0 <= self.dampening < 1.0:
            raise ValueError(f"dampening must be in [0, 1), got {self.dampening}")


@dataclass(frozen=True, kw_only=True)
class GeneralizedPrimalAveragingConfig(IterateAveragingConfig):
    """GPA with constant ``eval_interp_coeff`` (``μ_x``, in [0, 1)) and ``train_interp_coeff``
    (``μ_y``, in (0, 1]). ``SGD(lr, momentum=β)`` is GPA with ``μ_x = β``, ``μ_y = 1`` and learning
    rate ``lr / (1 − β)``; with ``nesterov=True``, ``μ_y = β``."""

    eval_interp_coeff: float = 0.9
    train_interp_coeff: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_interp_coeff < 1.0:
            raise ValueError(f"eval_interp_coeff must be in [0, 1), got {self.eval_interp_coeff}")
        if not 0.0 < self.train_interp_coeff <= 1.0:
            raise ValueError(f"train_interp_coeff must be in (0, 1], got {self.train_interp_coeff}")


@dataclass(frozen=True, kw_only=True)
class ScheduleFreeConfig(IterateAveragingConfig):
    """Schedule-Free: ``train_interp_coeff`` (``μ_y``, in (0, 1]) and the power ``p`` of the
    learning rate in the averaging weights (``μ_x = 1 − lr_tᵖ / Σ lr_sᵖ``)."""

    train_interp_coeff: float = 0.8
    eval_coeff_lr_power: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.train_interp_coeff <= 1.0:
            raise ValueError(f"train_interp_coeff must be in (0, 1], got {self.train_interp_coeff}")


def schedule_free_eval_coefficient(lr: float | Tensor, lr_sum: Tensor, power: int) -> Tensor:
    """Schedule-Free's ``μ_x`` of this step; adds ``lrᵖ`` to ``lr_sum`` (a 0-d tensor) in place.

    With a constant ``lr`` the ``t``-th step gives ``1 − 1/t``: ``x`` is the plain average of
    ``z₁ … z_t``."""
    weight = torch.as_tensor(lr, dtype=lr_sum.dtype, device=lr_sum.device) ** power
    lr_sum.add_(weight)
    return 1.0 - weight / lr_sum


def averaging_step_(
    params: Sequence[Tensor],
    z: Sequence[Tensor],
    updates: Sequence[Tensor],
    eval_coeff: float | Tensor,
    train_coeff: float | Tensor,
) -> None:
    """One train-mode step of GPA / Schedule-Free, in place.

    ``params`` hold ``y`` (where the gradients were taken), ``z`` the base iterates and
    ``updates`` the base optimizer's step ``−lr·P``. With ``μ_x = eval_coeff``, ``μ_y =
    train_coeff``: ``x = (y − (1−μ_y)z) / μ_y``, ``z⁺ = z − lr·P``, ``x⁺ = μ_x x + (1−μ_x) z⁺`` and
    ``y⁺ = μ_y x⁺ + (1−μ_y) z⁺``, which simplifies to::

        y⁺ = y + (1 − μ_x)(z − y) − (1 − μ_x μ_y)·lr·P

    (Distributed Shampoo's form; no division, so ``μ_y`` may be small).
    """
    params, z, updates = list(params), list(z), list(updates)
    difference = torch._foreach_sub(z, params)  # z − y, with the old z
    torch._foreach_add_(z, updates)
    step = torch._foreach_mul(updates, 1.0 - train_coeff * eval_coeff)
    _foreach_add_scaled_(step, difference, 1.0 - eval_coeff)
    torch._foreach_add_(params, step)


def train_to_eval_(params: Sequence[Tensor], z: Sequence[Tensor], train_coeff: float | Tensor) -> None:
    """Model weights ``y → x = (y − (1−μ_y)·z)/μ_y``: ``y += (1 − 1/μ_y)(z − y)``, in place."""
    params, z = list(params), list(z)
    difference = torch._foreach_sub(z, params)
    _foreach_add_scaled_(params, difference, 1.0 - 1.0 / train_coeff)


def eval_to_train_(params: Sequence[Tensor], z: Sequence[Tensor], train_coeff: float | Tensor) -> None:
    """Model weights ``x → y = μ_y·x + (1−μ_y)·z``: ``x += (1 − μ_y)(z − x)``, in place."""
    params, z = list(params), list(z)
    difference = torch._foreach_sub(z, params)
    _foreach_add_scaled_(params, difference, 1.0 - train_coeff)


def _foreach_add_scaled_(targets: Sequence[Tensor], values: Sequence[Tensor], scale: float | Tensor) -> None:
    """``targets += scale · values``; ``scale`` may be a 0-d tensor (no host sync)."""
    targets, values = list(targets), list(values)
    if isinstance(scale, Tensor):
        torch._foreach_mul_(values, scale)
        torch._foreach_add_(targets, values)
    else:
        torch._foreach_add_(targets, values, alpha=scale)
