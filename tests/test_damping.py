"""Scale-aware damping ``ε + ε_rtol · λ_max`` (``epsilon_rtol`` on the amortized configs): the pure
kernels against closed forms, both refresh paths (eigh and coupled Newton) of the Shampoo family,
the health figures it implies, and its validation. Distributed Shampoo's rule (``ε`` alone) stays
the configs' default."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import bucket_full
from lightning_helpers import cpu_trainer, digits
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_shampoo import (
    CoupledNewtonConfig,
    EigenConfig,
    EigendecomposedShampooPreconditionerConfig,
    EighEigendecompositionConfig,
    KLShampooPreconditionerConfig,
    QREigendecompositionConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
    ShampooCallback,
)
from lightning_shampoo.configure import EPSILON_RTOL, configure_shampoo, resolve_preset, with_epsilon_rtol
from lightning_shampoo.demo import DigitsClassifier
from lightning_shampoo.linalg import (
    coupled_newton_inverse_root,
    inverse_root_from_eigh,
    safe_eigh,
    scaled_epsilon,
    spectral_norm_lower_bound,
    spectrum_stats,
)

F64 = torch.float64
AMORTIZED = (EigenConfig, CoupledNewtonConfig, EighEigendecompositionConfig, QREigendecompositionConfig)


def _low_rank_psd(d: int, rank: int, scale: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, rank, generator=g, dtype=F64)
    return scale * (x @ x.mT) / rank


def _reference_root(a: Tensor, exponent: float, epsilon: float | Tensor) -> Tensor:
    """``(A + εI)^(-exponent)`` from a plain float64 ``eigh`` (independent of the kernels)."""
    values, vectors = torch.linalg.eigh(a)
    eps = torch.as_tensor(epsilon, dtype=a.dtype)
    eps = eps.unsqueeze(-1) if eps.ndim > 0 else eps
    return (vectors * (values.clamp_min(0) + eps).pow(-exponent).unsqueeze(-2)) @ vectors.mT


# ----------------------------------------------------------------------------------- kernels


def test_scaled_epsilon_is_absolute_plus_relative_to_the_largest_eigenvalue() -> None:
    largest = torch.tensor([2.0, 0.0, -1e-9], dtype=F64)
    assert scaled_epsilon(largest, 1e-12, 0.0) == 1e-12  # Distributed Shampoo's rule, untouched
    eps = scaled_epsilon(largest, 1e-12, 1e-3)
    assert isinstance(eps, Tensor)
    torch.testing.assert_close(eps, torch.tensor([1e-12 + 2e-3, 1e-12, 1e-12], dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("exponent", [0.25, 0.5, 1.0])
def test_eigh_root_with_relative_damping_matches_the_closed_form(exponent: float) -> None:
    a = torch.stack([_low_rank_psd(8, 3, 1e-4, seed=1), _low_rank_psd(8, 8, 10.0, seed=2)])
    values, vectors, failed = safe_eigh(a)
    assert not bool(failed.any())
    root = inverse_root_from_eigh(values, vectors, exponent, 1e-12, epsilon_rtol=1e-3)
    eps = 1e-12 + 1e-3 * torch.linalg.eigvalsh(a)[:, -1]
    torch.testing.assert_close(root, _reference_root(a, exponent, eps), rtol=1e-10, atol=0)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_relative_damping_is_scale_equivariant(scale: float) -> None:
    """With ``ε = 0`` the damped root of ``c·A`` is ``c^(-α)`` times that of ``A``: the damping
    follows the factor's units, where an absolute ``ε`` means something else at every scale."""
    a = _low_rank_psd(10, 4, 1.0, seed=3)  # rank-deficient: the null space is what damping sets
    values, vectors, _ = safe_eigh(a)
    base = inverse_root_from_eigh(values, vectors, 0.25, 0.0, epsilon_rtol=1e-4)
    values, vectors, _ = safe_eigh(scale * a)
    scaled = inverse_root_from_eigh(values, vectors, 0.25, 0.0, epsilon_rtol=1e-4)
    torch.testing.assert_close(scaled, scale**-0.25 * base, rtol=1e-9, atol=0)
    assert bool(torch.isfinite(base).all())


def test_relative_damping_caps_the_condition_number() -> None:
    a = _low_rank_psd(12, 2, 3.0, seed=4)
    values = torch.linalg.eigvalsh(a)
    cond = spectrum_stats(values, scaled_epsilon(values[-1], 1e-12, 1e-4)).condition_number
    assert 1e4 < float(cond) <= 1 + 1 / 1e-4  # singular factor: at the cap, not λ_max/ε ≈ 1e12
    assert float(spectrum_stats(values, 1e-12).condition_number) > 1e11


@pytest.mark.parametrize("root", [2, 4])
def test_coupled_newton_with_relative_damping_uses_the_largest_eigenvalue_estimate(root: int) -> None:
    a = torch.stack([_low_rank_psd(8, 3, 1e-3, seed=5), _low_rank_psd(8, 8, 5.0, seed=6)])
    estimate = spectral_norm_lower_bound(a)
    exact = torch.linalg.eigvalsh(a)[:, -1]
    assert bool((estimate <= exact * (1 + 1e-12)).all() and (estimate >= 0.95 * exact).all())
    result = coupled_newton_inverse_root(a, root, 1e-12, epsilon_rtol=1e-3, tolerance=1e-10)
    assert not bool(result.failed.any())
    reference = _reference_root(a, 1.0 / root, 1e-12 + 1e-3 * estimate)
    torch.testing.assert_close(result.root, reference, rtol=1e-6, atol=1e-8 * float(reference.abs().max()))


# ------------------------------------------------------------------------- Shampoo's refreshes


def _rank_one_steps(config: object, steps: int = 3) -> Shampoo:
    """Shampoo (sums, no grafting, refresh every step) after ``steps`` rank-one gradients on a
    float64 6×4 weight: its factors are rank-deficient throughout."""
    g = torch.Generator().manual_seed(7)
    param = nn.Parameter(torch.zeros(6, 4, dtype=F64))
    optimizer = Shampoo(
        [param],
        lr=0.1,
        betas=(0.0, 1.0),
        epsilon=1e-12,
        use_merge_dims=False,
        precondition_frequency=1,
        start_preconditioning_step=1,
        preconditioner_config=config,
    )
    for _ in range(steps):
        param.grad = torch.randn(6, 1, generator=g, dtype=F64) @ torch.randn(1, 4, generator=g, dtype=F64)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize(
    "config",
    [
        RootInvShampooPreconditionerConfig(amortized_computation_config=EigenConfig(epsilon_rtol=1e-3)),
        EigendecomposedShampooPreconditionerConfig(
            amortized_computation_config=EighEigendecompositionConfig(epsilon_rtol=1e-3)
        ),
    ],
    ids=["root-inverse", "eigendecomposed"],
)
def test_shampoo_refresh_damps_relative_to_each_factor(config: object) -> None:
    optimizer = _rank_one_steps(config)
    (state,) = optimizer.state.values()
    precond = state["precond"]
    (health,) = optimizer.health()
    for i in (0, 1):
        factor = bucket_full(precond[f"factor.{i}"])[0]
        assert factor.dtype == F64 and torch.linalg.matrix_rank(factor) == 3  # rank-deficient
        eps = 1e-12 + 1e-3 * torch.linalg.eigvalsh(factor)[-1]
        torch.testing.assert_close(
            bucket_full(precond[f"root.{i}"])[0], _reference_root(factor, 0.25, eps), rtol=1e-9, atol=0
        )
        assert health.condition_numbers[i] <= 1 + 1 / 1e-3  # the damped factor's condition, capped
    assert health.max_condition_number > 500  # singular factors sit near the cap


def test_shampoo_coupled_newton_refresh_honours_relative_damping() -> None:
    newton = RootInvShampooPreconditionerConfig(
        amortized_computation_config=CoupledNewtonConfig(epsilon_rtol=1e-3, tolerance=1e-10)
    )
    optimizer = _rank_one_steps(newton)
    (state,) = optimizer.state.values()
    for i in (0, 1):
        factor = bucket_full(state["precond"][f"factor.{i}"])
        eps = 1e-12 + 1e-3 * spectral_norm_lower_bound(factor)
        reference = _reference_root(factor, 0.25, eps)
        torch.testing.assert_close(
            bucket_full(state["precond"][f"root.{i}"]), reference, rtol=1e-6, atol=1e-9
        )
    eigh = _rank_one_steps(
        RootInvShampooPreconditionerConfig(amortized_computation_config=EigenConfig(epsilon_rtol=1e-3))
    )
    (other,) = eigh.state.values()
    # the two paths damp alike (λ_max estimated within a few percent): roots within ~1%
    torch.testing.assert_close(state["precond"]["root.0"], other["precond"]["root.0"], rtol=2e-2, atol=1e-6)


def test_kl_shampoo_with_relative_damping_stays_finite_on_rank_deficient_factors() -> None:
    config = KLShampooPreconditionerConfig(
        amortized_computation_config=EighEigendecompositionConfig(epsilon_rtol=1e-3),
        eigenvalue_correction=True,
    )
    optimizer = _rank_one_steps(config, steps=5)
    (state,) = optimizer.state.values()
    assert all(bool(torch.isfinite(t).all()) for t in state["precond"].values())
    (health,) = optimizer.health()
    assert health.failure_count == 0 and health.max_condition_number <= 1 + 1 / 1e-3


# ----------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config", AMORTIZED)
def test_relative_damping_is_off_by_default(config: type) -> None:
    assert config().epsilon_rtol == 0.0  # Distributed Shampoo's rule unless asked for


@pytest.mark.parametrize("config", AMORTIZED)
@pytest.mark.parametrize("value", [-1e-3, 1.0, True, "1e-3", float("nan")])
def test_bad_relative_damping_is_refused_naming_it(config: type, value: object) -> None:
    with pytest.raises(ValueError, match="epsilon_rtol"):
        config(epsilon_rtol=value)


# ------------------------------------------------------------------ the drop-in's reproducibility


def _trained(tmp_path: Path, callback: ShampooCallback, delta: float) -> Tensor:
    """The demo CNN's parameters after 16 steps of the drop-in, inputs × (1 + δ·z)."""
    data = digits()
    data.setup()
    assert data.train_set is not None
    x, y = data.train_set.tensors
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    data.train_set = TensorDataset(x * (1 + delta * z), y)
    torch.manual_seed(0)
    module = DigitsClassifier(channels=4, hidden=16)
    cpu_trainer(tmp_path, max_steps=16, callbacks=[callback]).fit(module, datamodule=data)
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def _sensitivity(tmp_path: Path, preconditioner: Any, **options: Any) -> float:
    runs = [
        _trained(tmp_path, ShampooCallback(preconditioner, health_monitor=False, **options), d)
        for d in (0.0, 1e-7)
    ]
    return float(torch.linalg.vector_norm(runs[1] - runs[0]) / torch.linalg.vector_norm(runs[0]))


def test_the_drop_in_default_is_insensitive_to_rounding_level_input_changes(tmp_path: Path) -> None:
    """A 1e-7 relative change of the inputs (float32 rounding level) moves the parameters after
    16 steps by ~1e-5 with the presets' relative damping, and by ~1e-2 with ``ε = 1e-12`` alone
    (Distributed Shampoo's rule: the rank-deficient factors' null space follows the rounding) under
    Distributed Shampoo's block rules. (The drop-in's own block rules give this CNN no large
    rank-deficient factor — its merged conv kernel and wide layer keep diagonals — so there even
    ``ε`` alone stays below 1e-5.)"""
    assert _sensitivity(tmp_path, "shampoo") < 2e-5
    ds_blocks = {"target_parameter_dimensionality": 1, "max_factor_ratio": math.inf}
    assert (
        _sensitivity(tmp_path, RootInvShampooPreconditionerConfig(), **ds_blocks) > 1e-3
    )  # epsilon_rtol = 0
    assert _sensitivity(tmp_path, RootInvShampooPreconditionerConfig()) < 2e-5


def _rtol(config: Any) -> float:
    return config.amortized_computation_config.epsilon_rtol


@pytest.mark.parametrize("preconditioner", ["shampoo", "eigen", "kl_shampoo"])
def test_the_drop_ins_shampoo_presets_damp_relative_to_each_factor(preconditioner: str) -> None:
    assert _rtol(ShampooCallback(preconditioner).options["preconditioner_config"]) == EPSILON_RTOL


def test_which_presets_and_configs_carry_the_relative_damping() -> None:
    """``configure_shampoo``'s ``"shampoo"``/``"eigen"`` keep ``ε`` alone (the damping moved their
    best lr on the suite's CNN); ``"kl_shampoo"`` has it; a config passed in is used as given."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for name, expected in (("shampoo", 0.0), ("eigen", 0.0), ("kl_shampoo", EPSILON_RTOL)):
        optimizer = configure_shampoo(model, name)
        assert isinstance(optimizer, Shampoo)
        assert _rtol(optimizer.param_groups[0]["preconditioner_config"]) == expected, name
    mine = RootInvShampooPreconditionerConfig()
    assert ShampooCallback(mine).options["preconditioner_config"] is mine
    soap = resolve_preset("soap").config
    assert with_epsilon_rtol(soap, 1e-3) is soap  # SOAP inverts no factor
    damped = with_epsilon_rtol(KLShampooPreconditionerConfig(eigenvalue_correction=True), 1e-3)
    assert isinstance(damped, KLShampooPreconditionerConfig) and damped.eigenvalue_correction
    assert _rtol(damped) == 1e-3


class _NoOptimizer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsClassifier(channels=4, hidden=16).net

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def test_a_module_without_optimizer_gets_the_drop_ins_damping(tmp_path: Path) -> None:
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[ShampooCallback(health_monitor=False)])
    trainer.fit(_NoOptimizer(), datamodule=digits())
    configs = [g["preconditioner_config"] for g in trainer.optimizers[0].param_groups]
    factored = [c for c in configs if isinstance(c, RootInvShampooPreconditionerConfig)]
    assert factored and all(_rtol(c) == EPSILON_RTOL for c in factored)
