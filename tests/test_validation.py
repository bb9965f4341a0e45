"""Argument validation: every invalid value raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lightning_shampoo import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    EigenConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    KLShampooPreconditionerConfig,
    PreconditionerConfig,
    QREigendecompositionConfig,
    RMSpropPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SGDPreconditionerConfig,
    Shampoo,
)


def _params():
    return [nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(3))]


@dataclass(frozen=True)
class _UnknownConfig(PreconditionerConfig):
    """A config type no preconditioner is registered for."""


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lr=-1e-3), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(lr=torch.tensor([0.1, 0.2])), "lr"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, 0.0)), r"betas\[1\]"),
        (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
        (dict(betas=(0.9,)), "betas"),
        (dict(beta3=1.0), "beta3"),
        (dict(beta3=-0.5), "beta3"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1e-12), "epsilon"),
        (dict(epsilon=math.nan), "epsilon"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=0.9, dampening=1.0), "dampening"),
        (dict(momentum=0.9, dampening=-0.5), "dampening"),
        (dict(use_nesterov=True), "use_nesterov"),
        (dict(use_nesterov=True, momentum=0.9, dampening=0.1, use_torch_momentum=True), "use_nesterov"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay=math.nan), "weight_decay"),
        (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
        (dict(max_preconditioner_dim=2.5), "max_preconditioner_dim"),
        (dict(max_preconditioner_dim=-8), "max_preconditioner_dim"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(precondition_frequency=1.5), "precondition_frequency"),
        (dict(precondition_frequency=True), "precondition_frequency"),
        (dict(precondition_frequency=10, start_preconditioning_step=5), "start_preconditioning_step"),
        (dict(start_preconditioning_step=0), "start_preconditioning_step"),
        (dict(start_preconditioning_step=2.5), "start_preconditioning_step"),
        (dict(preconditioner_config=AdamPreconditionerConfig), "preconditioner_config"),  # a class
        (dict(preconditioner_config="shampoo"), "preconditioner_config"),
        (dict(preconditioner_config=_UnknownConfig()), "preconditioner_config"),
        (dict(grafting_config=RootInvShampooPreconditionerConfig()), "grafting_config"),
        (dict(grafting_config=EigenvalueCorrectedShampooPreconditionerConfig()), "grafting_config"),
        (dict(grafting_config="adam"), "grafting_config"),
        (dict(use_bias_correction=1), "use_bias_correction"),
        (dict(use_decoupled_weight_decay="yes"), "use_decoupled_weight_decay"),
        (dict(use_merge_dims=None), "use_merge_dims"),
    ],
)
def test_invalid_argument_names_itself(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Shampoo(_params(), **kwargs)


def test_invalid_value_in_a_param_group_names_itself():
    params = _params()
    with pytest.raises(ValueError, match="lr"):
        Shampoo([{"params": params[:1]}, {"params": params[1:], "lr": -1.0}])
    opt = Shampoo(params[:1])
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": params[1:], "weight_decay": -1.0})
    assert len(opt.param_groups) == 1  # the rejected group was not kept
    with pytest.raises(ValueError, match="stacked"):
        Shampoo([{"params": params[1:], "stacked": True}])  # a 1-D parameter cannot be stacked


def test_coupled_newton_needs_an_integer_root():
    config = RootInvShampooPreconditionerConfig(
        amortized_computation_config=CoupledNewtonConfig(), inverse_exponent_override={2: 0.3}
    )
    with pytest.raises(ValueError, match=r"CoupledNewtonConfig.*integer root"):
        Shampoo([nn.Parameter(torch.ones(4, 3))], max_preconditioner_dim=2, preconditioner_config=config)
    # Integer roots are fine: 1/0.25 = 4.
    ok = RootInvShampooPreconditionerConfig(
        amortized_computation_config=CoupledNewtonConfig(), inverse_exponent_override={2: 0.25}
    )
    Shampoo([nn.Parameter(torch.ones(4, 3))], max_preconditioner_dim=2, preconditioner_config=ok)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: AdamPreconditionerConfig(beta2=1.5), "beta2"),
        (lambda: AdamPreconditionerConfig(beta2=0.0), "beta2"),
        (lambda: RMSpropPreconditionerConfig(epsilon=0.0), "epsilon"),
        (lambda: AdaGradPreconditionerConfig(epsilon=-1.0), "epsilon"),
        (lambda: EigenConfig(rank_rtol=2), "rank_rtol"),
        (lambda: EigenConfig(rank_rtol=0.0), "rank_rtol"),
        (lambda: QREigendecompositionConfig(power_iter_steps=0), "power_iter_steps"),
        (lambda: CoupledNewtonConfig(max_iterations=0), "max_iterations"),
        (lambda: CoupledNewtonConfig(tolerance=0.0), "tolerance"),
        (
            lambda: RootInvShampooPreconditionerConfig(factor_matrix_dtype=torch.float16),
            "factor_matrix_dtype",
        ),
        (
            lambda: RootInvShampooPreconditionerConfig(inv_factor_matrix_dtype=torch.bfloat16),
            "inv_factor_matrix_dtype",
        ),
        (
            lambda: EigendecomposedShampooPreconditionerConfig(factor_matrix_eigenvectors_dtype=torch.int32),
            "factor_matrix_eigenvectors_dtype",
        ),
        (
            lambda: EigenvalueCorrectedShampooPreconditionerConfig(corrected_eigenvalues_dtype=torch.float16),
            "corrected_eigenvalues_dtype",
        ),
        (
            lambda: RootInvShampooPreconditionerConfig(
                amortized_computation_config=QREigendecompositionConfig()
            ),
            "amortized_computation_config",
        ),
        (
            lambda: KLShampooPreconditionerConfig(amortized_computation_config=EigenConfig()),
            "amortized_computation_config",
        ),
        (
            lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override={2: -0.5}),
            "inverse_exponent_override",
        ),
        (
            lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override={2: {5: 0.5}}),
            "inverse_exponent_override",
        ),
        (
            lambda: EigenvalueCorrectedShampooPreconditionerConfig(ignored_basis_change_dims={2: [0, 0]}),
            "ignored_basis_change_dims",
        ),
    ],
)
def test_config_post_init_checks(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_epsilon_zero_allowed_with_pseudo_inverse():
    config = RootInvShampooPreconditionerConfig(amortized_computation_config=EigenConfig(pseudo_inverse=True))
    params = _params()
    opt = Shampoo(params, epsilon=0.0, preconditioner_config=config)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    with pytest.raises(ValueError, match="epsilon"):
        Shampoo(_params(), epsilon=-1.0, preconditioner_config=config)


def test_start_preconditioning_step_defaults_and_infinity():
    opt = Shampoo(_params(), precondition_frequency=7)
    assert opt.param_groups[0]["start_preconditioning_step"] == 7
    opt = Shampoo(
        [{"params": _params()[:1]}, {"params": _params()[1:], "precondition_frequency": 3}],
        precondition_frequency=5,
    )
    assert [g["start_preconditioning_step"] for g in opt.param_groups] == [5, 3]
    opt = Shampoo(_params(), start_preconditioning_step=math.inf, grafting_config=SGDPreconditionerConfig())
    assert opt.param_groups[0]["start_preconditioning_step"] == math.inf
    opt = Shampoo(_params(), max_preconditioner_dim=math.inf)
    assert opt.param_groups[0]["max_preconditioner_dim"] == math.inf
    opt = Shampoo(_params(), precondition_frequency=10, start_preconditioning_step=10)
    assert opt.param_groups[0]["start_preconditioning_step"] == 10


def test_valid_edge_values_are_accepted():
    Shampoo(_params(), lr=0.0, betas=(0.0, 1.0), beta3=0.0, weight_decay=0.0, momentum=0.0)
    Shampoo(_params(), lr=torch.tensor(0.01), momentum=0.9, use_nesterov=True)
    Shampoo(_params(), max_preconditioner_dim=1)
    for graft in (SGDPreconditionerConfig(), AdaGradPreconditionerConfig(), RMSpropPreconditionerConfig()):
        Shampoo(_params(), grafting_config=graft)
