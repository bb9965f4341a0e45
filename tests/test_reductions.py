"""Reductions: with preconditioning never started, ``Shampoo`` *is* its grafting optimizer.

With ``start_preconditioning_step=math.inf`` every step takes the grafting direction, so
``Shampoo`` must reproduce ``torch.optim.X`` for grafting ``X`` — whatever the (unused but still
updated) Shampoo-family preconditioner is. Checked over 20 steps of a small model with a conv
weight, a 3-D parameter and biases, blocked into several buckets, at default tolerances.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import assert_same_parameters, side_by_side
from torch import nn

from lightning_shampoo import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    EighEigendecompositionConfig,
    KLShampooPreconditionerConfig,
    QREigendecompositionConfig,
    RMSpropPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SGDPreconditionerConfig,
    Shampoo,
)

PRECONDITIONERS: dict[str, Any] = {
    "root_inv_eigh": RootInvShampooPreconditionerConfig(),
    "root_inv_newton": RootInvShampooPreconditionerConfig(amortized_computation_config=CoupledNewtonConfig()),
    "eigen_eigh": EigendecomposedShampooPreconditionerConfig(
        amortized_computation_config=EighEigendecompositionConfig()
    ),
    "eigen_qr": EigendecomposedShampooPreconditionerConfig(
        amortized_computation_config=QREigendecompositionConfig()
    ),
    "soap": EigenvalueCorrectedShampooPreconditionerConfig(),
    "kl": KLShampooPreconditionerConfig(),
    "kl_corrected": KLShampooPreconditionerConfig(eigenvalue_correction=True),
}

# name → (Shampoo keyword arguments, reference factory(params, weight_decay)).
# Hyperparameters are deliberately not torch's defaults, so that a default silently used on
# one side cannot agree by accident.
Reference = Callable[[Any, float], torch.optim.Optimizer]
CASES: dict[str, tuple[dict[str, Any], Reference]] = {
    "adam": (
        dict(
            lr=0.01,
            betas=(0.8, 0.999),
            grafting_config=AdamPreconditionerConfig(beta2=0.95, epsilon=1e-6),
            use_decoupled_weight_decay=False,
        ),
        lambda p, wd: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd),
    ),
    "adamw": (
        dict(
            lr=0.01,
            betas=(0.8, 0.999),
            grafting_config=AdamPreconditionerConfig(beta2=0.95, epsilon=1e-6),
            use_decoupled_weight_decay=True,
        ),
        lambda p, wd: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd),
    ),
    "adagrad": (
        dict(
            lr=0.05,
            betas=(0.0, 1.0),
            grafting_config=AdaGradPreconditionerConfig(epsilon=1e-10),
            use_decoupled_weight_decay=False,
        ),
        lambda p, wd: torch.optim.Adagrad(p, lr=0.05, eps=1e-10, weight_decay=wd),
    ),
    "rmsprop": (
        dict(
            lr=0.01,
            betas=(0.0, 0.99),
            grafting_config=RMSpropPreconditionerConfig(beta2=0.9, epsilon=1e-6),
            use_bias_correction=False,
            use_decoupled_weight_decay=False,
        ),
        lambda p, wd: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, weight_decay=wd),
    ),
    "rmsprop_momentum": (
        dict(
            lr=0.01,
            betas=(0.0, 0.99),
            momentum=0.5,
            grafting_config=RMSpropPreconditionerConfig(beta2=0.9, epsilon=1e-6),
            use_bias_correction=False,
            use_decoupled_weight_decay=False,
        ),
        lambda p, wd: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, momentum=0.5, weight_decay=wd),
    ),
    "sgd": (
        dict(lr=0.05, betas=(0.0, 1.0), grafting_config=SGDPreconditionerConfig()),
        lambda p, wd: torch.optim.SGD(p, lr=0.05, weight_decay=wd),
    ),
    "sgd_momentum": (
        dict(lr=0.05, betas=(0.0, 1.0), momentum=0.9, grafting_config=SGDPreconditionerConfig()),
        lambda p, wd: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=wd),
    ),
    "sgd_dampening": (
        dict(
            lr=0.05,
            betas=(0.0, 1.0),
            momentum=0.9,
            dampening=0.3,
            use_torch_momentum=True,  # torch's undamped first step (Distributed Shampoo damps it)
            grafting_config=SGDPreconditionerConfig(),
            use_decoupled_weight_decay=False,
        ),
        lambda p, wd: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=wd),
    ),
    "sgd_nesterov": (
        dict(
            lr=0.05,
            betas=(0.0, 1.0),
            momentum=0.9,
            use_nesterov=True,
            grafting_config=SGDPreconditionerConfig(),
            use_decoupled_weight_decay=False,
        ),
        lambda p, wd: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=wd),
    ),
}


def _shampoo(model: nn.Module, preconditioner: Any, weight_decay: float, **kwargs: Any) -> Shampoo:
    # Small blocks: the model splits into several buckets of 1-, 2- and 3-D blocks.
    return Shampoo(
        model.parameters(),
        weight_decay=weight_decay,
        max_preconditioner_dim=8,
        start_preconditioning_step=math.inf,
        preconditioner_config=preconditioner,
        **kwargs,
    )


def _combinations() -> list[tuple[str, str, float]]:
    """Every (preconditioner, X) pair with weight decay 0.1; weight decay 0 for every X with one
    preconditioner and for every preconditioner with Adam and Nesterov SGD (the decay-free path
    shares everything else), keeping the file fast."""
    full = [(p, c, 0.1) for p in PRECONDITIONERS for c in CASES]
    no_decay = {(p, c, 0.0) for p in PRECONDITIONERS for c in ("adam", "sgd_nesterov")}
    no_decay |= {("root_inv_eigh", c, 0.0) for c in CASES}
    return full + sorted(no_decay)


@pytest.mark.parametrize(("preconditioner", "case", "weight_decay"), _combinations())
def test_grafting_only_reproduces_torch_optimizer(
    preconditioner: str, case: str, weight_decay: float
) -> None:
    kwargs, reference = CASES[case]
    ours, ref = side_by_side(
        lambda m: _shampoo(m, PRECONDITIONERS[preconditioner], weight_decay, **kwargs),
        lambda m: reference(m.parameters(), weight_decay),
    )
    assert_same_parameters(ours, ref)


def test_blocking_really_splits_the_model() -> None:
    """The reductions above exercise several buckets, of 1-, 2- and 3-D blocks."""
    from helpers import small_model

    optimizer = _shampoo(small_model(), RootInvShampooPreconditionerConfig(), 0.0)
    shapes = {plan.block_shape for plan in optimizer.buckets}
    assert {len(s) for s in shapes} == {1, 2, 3}
    assert len(optimizer.buckets) >= 7


def test_weight_decay_modes_differ() -> None:
    """L2 and decoupled decay are told apart (so the Adam/AdamW cases above test something)."""
    kwargs, _ = CASES["adam"]
    decoupled = {**kwargs, "use_decoupled_weight_decay": True}
    l2, dec = side_by_side(
        lambda m: _shampoo(m, RootInvShampooPreconditionerConfig(), 0.1, **kwargs),
        lambda m: _shampoo(m, RootInvShampooPreconditionerConfig(), 0.1, **decoupled),
    )
    difference = max((a - b).abs().max().item() for a, b in zip(l2.parameters(), dec.parameters()))
    assert difference > 1e-4
