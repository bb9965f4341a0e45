"""Iterate averaging as pure functions: each reduces to a known update on a quadratic.

* GPA with ``μ_y = 1`` and learning rate ``lr/(1−β)`` is heavy-ball ``SGD(lr, momentum=β)``;
  with ``μ_y = μ_x = β`` it is Nesterov's;
* Schedule-Free follows the paper's three sequences (``y`` interpolates, ``z`` takes gradient
  steps at ``y``, ``x`` is the running average of the ``z``), and ``μ_x = 1 − 1/t`` at a
  constant learning rate;
* the train ↔ eval swap moves the weights from ``y`` to ``x`` and back exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_shampoo.averaging import (
    ClassicMomentumConfig,
    GeneralizedPrimalAveragingConfig,
    ScheduleFreeConfig,
    averaging_step_,
    eval_to_train_,
    schedule_free_eval_coefficient,
    train_to_eval_,
)

F64 = torch.float64


def _quadratic(d: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``f(w) = ½ (w − w*)ᵀ A (w − w*)`` with a well-conditioned SPD ``A``."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=F64)
    return m @ m.mT / d + torch.eye(d, dtype=F64), torch.randn(d, generator=g, dtype=F64)


def _grad(a: Tensor, target: Tensor, w: Tensor) -> Tensor:
    return a @ (w - target)


def _gpa(a: Tensor, target: Tensor, lr: float, mu_x: float, mu_y: float, steps: int) -> list[Tensor]:
    """The model's weights ``y`` along GPA, as a list over steps (blocks: two halves of ``w``)."""
    w = torch.zeros(a.shape[0], dtype=F64)
    params, z = [w[:2].clone(), w[2:].clone()], [w[:2].clone(), w[2:].clone()]
    out = []
    for _ in range(steps):
        g = _grad(a, target, torch.cat(params))
        averaging_step_(params, z, [-lr * g[:2], -lr * g[2:]], mu_x, mu_y)
        out.append(torch.cat(params))
    return out


@pytest.mark.parametrize("nesterov", [False, True])
def test_gpa_is_sgd_momentum(nesterov: bool) -> None:
    a, target = _quadratic()
    lr, beta = 0.05, 0.9
    w = torch.zeros(5, dtype=F64, requires_grad=True)
    sgd = torch.optim.SGD([w], lr=lr, momentum=beta, nesterov=nesterov)
    ours = _gpa(a, target, lr / (1 - beta), beta, beta if nesterov else 1.0, 30)
    for y in ours:
        w.grad = _grad(a, target, w.detach())
        sgd.step()
        torch.testing.assert_close(y, w.detach(), rtol=1e-10, atol=1e-12)
    assert (ours[-1] - ours[0]).norm() > 0.1  # it moved


def test_gpa_without_averaging_is_the_base_optimizer() -> None:
    """``μ_x = 0``: ``x = z``, so ``y = z`` is plain gradient descent."""
    a, target = _quadratic()
    lr, w = 0.1, torch.zeros(5, dtype=F64)
    for y in _gpa(a, target, lr, 0.0, 0.7, 10):
        w = w - lr * _grad(a, target, w)
        torch.testing.assert_close(y, w, rtol=1e-12, atol=1e-14)


def test_schedule_free_follows_the_papers_sequences() -> None:
    """Defazio et al.: ``y = (1−β)z + βx``, ``z ← z − γ∇f(y)``, ``x ← (1 − c)x + c z`` with
    ``c = γ²/Σγ²`` (warm-up lr schedule, power 2); ``β`` is ``train_interp_coeff``."""
    a, target = _quadratic(seed=1)
    beta, lrs = 0.9, [0.02, 0.05, 0.1, 0.1, 0.1, 0.1, 0.08, 0.05]
    params, z = [torch.zeros(5, dtype=F64)], [torch.zeros(5, dtype=F64)]
    lr_sum = torch.zeros((), dtype=F64)
    x_ref, z_ref, total = torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64), 0.0
    for lr in lrs:
        mu_x = schedule_free_eval_coefficient(lr, lr_sum, power=2)
        g = _grad(a, target, params[0])
        averaging_step_(params, z, [-lr * g], mu_x, beta)
        y_ref = (1 - beta) * z_ref + beta * x_ref
        z_ref = z_ref - lr * _grad(a, target, y_ref)
        total += lr**2
        c = lr**2 / total
        x_ref = (1 - c) * x_ref + c * z_ref
        y_next = (1 - beta) * z_ref + beta * x_ref
        torch.testing.assert_close(params[0], y_next, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(z[0], z_ref, rtol=1e-10, atol=1e-12)
    evaluated = [params[0].clone()]
    train_to_eval_(evaluated, z, beta)
    torch.testing.assert_close(evaluated[0], x_ref, rtol=1e-10, atol=1e-12)


def test_schedule_free_coefficient_is_a_uniform_average_at_constant_lr() -> None:
    lr_sum = torch.zeros((), dtype=F64)
    values = [float(schedule_free_eval_coefficient(0.1, lr_sum, power=2)) for _ in range(4)]
    assert values == pytest.approx([0.0, 1 / 2, 2 / 3, 3 / 4])
    assert float(lr_sum) == pytest.approx(4 * 0.01)


@pytest.mark.parametrize("mu_y", [0.3, 0.8, 1.0])
def test_train_eval_swap_is_exact(mu_y: float) -> None:
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    y = mu_y * x + (1 - mu_y) * z
    params = [y.clone()]
    train_to_eval_(params, [z], mu_y)
    torch.testing.assert_close(params[0], x, rtol=1e-12, atol=1e-14)
    eval_to_train_(params, [z], torch.tensor(mu_y, dtype=F64))  # a 0-d tensor coefficient too
    torch.testing.assert_close(params[0], y, rtol=1e-12, atol=1e-14)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="eval_interp_coeff"):
        GeneralizedPrimalAveragingConfig(eval_interp_coeff=1.0)
    with pytest.raises(ValueError, match="train_interp_coeff"):
        GeneralizedPrimalAveragingConfig(train_interp_coeff=0.0)
    with pytest.raises(ValueError, match="train_interp_coeff"):
        ScheduleFreeConfig(train_interp_coeff=1.5)
    with pytest.raises(ValueError, match="dampening"):
        ClassicMomentumConfig(dampening=1.0)
    assert (
        GeneralizedPrimalAveragingConfig().eval_interp_coeff,
        ScheduleFreeConfig().eval_coeff_lr_power,
    ) == (
        0.9,
        2,
    )
