"""Hostile inputs (issue 16), the config side: every preconditioner config, schedule and strategy
refuses a bad value with a ``ValueError`` that names the field (see ``test_hostile_inputs.py``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_shampoo import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    EigenConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    EighEigendecompositionConfig,
    KLShampooPreconditionerConfig,
    NewtonSchulzOrthogonalizationConfig,
    PSGDKronPreconditionerConfig,
    PSGDUpdateProbabilitySchedule,
    QREigendecompositionConfig,
    RMSpropPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
)
from lightning_shampoo.schedules import (
    AdaptiveFrequency,
    ConstantFrequency,
    LogFrequency,
    MilestoneFrequency,
    WarmupCosine,
    WarmupLinear,
)
from lightning_shampoo.strategies import ShampooDDPStrategy, ShampooFSDPStrategy

nan, inf = math.nan, math.inf
Row = tuple[str, Callable[[], Any], str]

CONFIGS: list[Row] = [
    ("AdaGrad epsilon str", lambda: AdaGradPreconditionerConfig(epsilon="1e-8"), "epsilon"),
    ("AdaGrad epsilon inf", lambda: AdaGradPreconditionerConfig(epsilon=inf), "epsilon"),
    ("RMSprop beta2 nan", lambda: RMSpropPreconditionerConfig(beta2=nan), "beta2"),
    ("Adam beta2 str", lambda: AdamPreconditionerConfig(beta2="0.999"), "beta2"),
    ("Adam epsilon nan", lambda: AdamPreconditionerConfig(epsilon=nan), "epsilon"),
    ("Eigen rank_rtol nan", lambda: EigenConfig(rank_rtol=nan), "rank_rtol"),
    ("Eigen pseudo_inverse str", lambda: EigenConfig(pseudo_inverse="yes"), "pseudo_inverse"),
    ("Eigen retry int", lambda: EigenConfig(retry_double_precision=1), "retry_double_precision"),
    ("Eigh retry str", lambda: EighEigendecompositionConfig(retry_double_precision="no"), "retry_double"),
    ("CoupledNewton max_iterations float", lambda: CoupledNewtonConfig(max_iterations=1.5), "max_iterations"),
    ("CoupledNewton max_iterations str", lambda: CoupledNewtonConfig(max_iterations="10"), "max_iterations"),
    ("CoupledNewton tolerance nan", lambda: CoupledNewtonConfig(tolerance=nan), "tolerance"),
    ("QR power_iter_steps nan", lambda: QREigendecompositionConfig(power_iter_steps=nan), "power_iter_steps"),
    (
        "QR sort_eigenvectors int",
        lambda: QREigendecompositionConfig(sort_eigenvectors=1),
        "sort_eigenvectors",
    ),
    (
        "RootInv exponent nan",
        lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override={2: nan}),
        "inverse_exponent_override",
    ),
    (
        "RootInv exponent str",
        lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override={2: "0.5"}),
        "inverse_exponent_override",
    ),
    (
        "RootInv exponent key str",
        lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override={"2": 0.5}),
        "inverse_exponent_override",
    ),
    (
        "RootInv exponent not a mapping",
        lambda: RootInvShampooPreconditionerConfig(inverse_exponent_override=[0.5]),
        "inverse_exponent_override",
    ),
    (
        "RootInv amortized str",
        lambda: RootInvShampooPreconditionerConfig(amortized_computation_config="eigh"),
        "amortized_computation_config",
    ),
    (
        "Eigendecomposed dtype str",
        lambda: EigendecomposedShampooPreconditionerConfig(factor_matrix_dtype="float32"),
        "factor_matrix_dtype",
    ),
    (
        "KL correction str",
        lambda: KLShampooPreconditionerConfig(eigenvalue_correction="yes"),
        "eigenvalue_correction",
    ),
    (
        "SOAP exponent zero",
        lambda: EigenvalueCorrectedShampooPreconditionerConfig(inverse_exponent_override={2: 0.0}),
        "inverse_exponent_override",
    ),
    (
        "SOAP ignored dims str",
        lambda: EigenvalueCorrectedShampooPreconditionerConfig(ignored_basis_change_dims={2: "01"}),
        "ignored_basis_change_dims",
    ),
    (
        "SOAP ignored dims float",
        lambda: EigenvalueCorrectedShampooPreconditionerConfig(ignored_basis_change_dims={2: [0.5]}),
        "ignored_basis_change_dims",
    ),
    (
        "SOAP rotate int",
        lambda: EigenvalueCorrectedShampooPreconditionerConfig(rotate_corrected_eigenvalues=1),
        "rotate_corrected_eigenvalues",
    ),
    ("SignDescent scale_fn int", lambda: SignDescentPreconditionerConfig(scale_fn=3), "scale_fn"),
    (
        "NewtonSchulz iterations nan",
        lambda: NewtonSchulzOrthogonalizationConfig(num_iterations=nan),
        "num_iterations",
    ),
    (
        "NewtonSchulz coefficients pair",
        lambda: NewtonSchulzOrthogonalizationConfig(coefficients=(1, 2)),
        "coefficients",
    ),
    (
        "NewtonSchulz coefficient nan",
        lambda: NewtonSchulzOrthogonalizationConfig(coefficients=(nan, 1.0, 1.0)),
        "coefficients[0]",
    ),
    (
        "Spectral orthogonalization str",
        lambda: SpectralDescentPreconditionerConfig(orthogonalization_config="ns"),
        "orthogonalization_config",
    ),
    ("Spectral scale None", lambda: SpectralDescentPreconditionerConfig(scale=None), "scale"),
    (
        "PSGD preconditioner_lr nan",
        lambda: PSGDKronPreconditionerConfig(preconditioner_lr=nan),
        "preconditioner_lr",
    ),
    ("PSGD lipschitz_beta nan", lambda: PSGDKronPreconditionerConfig(lipschitz_beta=nan), "lipschitz_beta"),
    (
        "PSGD lipschitz_beta bool",
        lambda: PSGDKronPreconditionerConfig(lipschitz_beta=False),
        "lipschitz_beta",
    ),
    ("PSGD damping inf", lambda: PSGDKronPreconditionerConfig(damping=inf), "damping"),
    ("PSGD init_scale nan", lambda: PSGDKronPreconditionerConfig(init_scale=nan), "init_scale"),
    (
        "PSGD max_size_triangular nan",
        lambda: PSGDKronPreconditionerConfig(max_size_triangular=nan),
        "max_size",
    ),
    ("PSGD max_skew nan", lambda: PSGDKronPreconditionerConfig(max_skew=nan), "max_skew"),
    (
        "PSGD min_ndim_triangular bool",
        lambda: PSGDKronPreconditionerConfig(min_ndim_triangular=True),
        "min_ndim",
    ),
    (
        "PSGD health_interval float",
        lambda: PSGDKronPreconditionerConfig(health_interval=1.5),
        "health_interval",
    ),
    ("PSGD max_update_rms nan", lambda: PSGDKronPreconditionerConfig(max_update_rms=nan), "max_update_rms"),
    ("PSGD mode None", lambda: PSGDKronPreconditionerConfig(mode=None), "mode"),
    (
        "PSGD probability nan",
        lambda: PSGDKronPreconditionerConfig(preconditioner_update_probability=nan),
        "preconditioner_update_probability",
    ),
    (
        "PSGD probability str",
        lambda: PSGDKronPreconditionerConfig(preconditioner_update_probability="0.5"),
        "preconditioner_update_probability",
    ),
    (
        "schedule max_probability nan",
        lambda: PSGDUpdateProbabilitySchedule(max_probability=nan),
        "max_probability",
    ),
    (
        "schedule min_probability str",
        lambda: PSGDUpdateProbabilitySchedule(min_probability="0.1"),
        "min_probability",
    ),
    ("schedule decay inf", lambda: PSGDUpdateProbabilitySchedule(decay=inf), "decay"),
    ("schedule flat_steps bool", lambda: PSGDUpdateProbabilitySchedule(flat_steps=True), "flat_steps"),
]

SCHEDULES: list[Row] = [
    ("ConstantFrequency nan", lambda: ConstantFrequency(nan), "frequency"),
    ("ConstantFrequency str", lambda: ConstantFrequency("5"), "frequency"),
    ("MilestoneFrequency int", lambda: MilestoneFrequency(5), "milestones"),
    ("MilestoneFrequency step str", lambda: MilestoneFrequency([("0", 5)]), "milestones[0] step"),
    ("MilestoneFrequency frequency nan", lambda: MilestoneFrequency([(0, nan)]), "milestones[0] frequency"),
    ("LogFrequency nan", lambda: LogFrequency(min_frequency=nan), "min_frequency"),
    ("AdaptiveFrequency tolerance nan", lambda: AdaptiveFrequency(tolerance=nan), "tolerance"),
    ("AdaptiveFrequency tolerance str", lambda: AdaptiveFrequency(tolerance="x"), "tolerance"),
    ("WarmupCosine total nan", lambda: WarmupCosine(nan), "total_steps"),
    ("WarmupCosine warmup bool", lambda: WarmupCosine(10, warmup_steps=True), "warmup_steps"),
    ("WarmupCosine min_ratio nan", lambda: WarmupCosine(10, min_ratio=nan), "min_ratio"),
    ("WarmupLinear total str", lambda: WarmupLinear("10"), "total_steps"),
    (
        "DDP communication_dtype str",
        lambda: ShampooDDPStrategy(communication_dtype="bf16"),
        "communication_dtype",
    ),
    (
        "DDP communication_dtype int",
        lambda: ShampooDDPStrategy(communication_dtype=torch.int8),
        "communication",
    ),
    (
        "FSDP communication_dtype",
        lambda: ShampooFSDPStrategy(communication_dtype=torch.int32),
        "communication_dtype",
    ),
]

TABLE = CONFIGS + SCHEDULES


@pytest.mark.parametrize(("call", "name"), [pytest.param(c, n, id=d) for d, c, n in TABLE])
def test_refused_naming_the_field(call: Callable[[], Any], name: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert name in str(info.value)
