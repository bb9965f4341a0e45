"""Sign descent and spectral (orthogonalized, Muon-style) descent against closed forms."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_shampoo import (
    NewtonSchulzOrthogonalizationConfig,
    Shampoo,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
    SVDOrthogonalizationConfig,
)

LR = 0.1
SVD = SpectralDescentPreconditionerConfig(orthogonalization_config=SVDOrthogonalizationConfig())


def _polar(x: Tensor) -> Tensor:
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u @ vh).to(x.dtype)


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _block_l1(x: Tensor) -> Tensor:
    return x.abs().flatten(1).sum(1)


def test_sign_descent_is_sign_of_filtered_gradient() -> None:
    beta1 = 0.9
    weight, bias = nn.Parameter(torch.zeros(6, 4)), nn.Parameter(torch.zeros(4))
    optimizer = Shampoo(
        [weight, bias], lr=LR, betas=(beta1, 1.0), preconditioner_config=SignDescentPreconditionerConfig()
    )
    momentum = [torch.zeros(6, 4), torch.zeros(4)]
    flipped = 0
    for t in range(4):
        grads = [_randn(6, 4, seed=t), _randn(4, seed=10 + t)]
        befores = []
        for p, g in zip((weight, bias), grads):
            p.grad = g.clone()
            befores.append(p.detach().clone())
        optimizer.step()
        for k, (p, g, before) in enumerate(zip((weight, bias), grads, befores)):
            momentum[k] = beta1 * momentum[k] + (1 - beta1) * g
            torch.testing.assert_close(p.detach() - before, -LR * momentum[k].sign(), rtol=0, atol=1e-7)
            flipped += int((momentum[k].sign() != g.sign()).sum())
    assert flipped > 0  # the filter mattered: sign(m) ≠ sign(g) somewhere


def test_sign_descent_scale_fn_scales_each_block() -> None:
    """``scale_fn`` returns per-block scales of a bucket: with the ℓ₁ norm each block of a
    [10, 4] weight in 4x4 / 2x4 blocks moves by ``-lr·‖G_b‖₁·sign(G_b)``."""
    weight = nn.Parameter(torch.zeros(10, 4))
    config = SignDescentPreconditionerConfig(scale_fn=_block_l1)
    optimizer = Shampoo(
        [weight], lr=LR, betas=(0.0, 1.0), max_preconditioner_dim=4, preconditioner_config=config
    )
    grad = _randn(10, 4, seed=3)
    weight.grad = grad.clone()
    optimizer.step()
    assert sorted(plan.block_shape for plan in optimizer.buckets) == [(2, 4), (4, 4)]
    for rows in (slice(0, 4), slice(4, 8), slice(8, 10)):
        block = grad[rows]
        torch.testing.assert_close(weight.detach()[rows], -LR * block.abs().sum() * block.sign())


def test_sign_descent_scalar_scale_fn() -> None:
    weight = nn.Parameter(torch.zeros(3, 5))
    config = SignDescentPreconditionerConfig(scale_fn=lambda g: 0.25)
    optimizer = Shampoo([weight], lr=LR, betas=(0.0, 1.0), preconditioner_config=config)
    grad = _randn(3, 5, seed=4)
    weight.grad = grad.clone()
    optimizer.step()
    torch.testing.assert_close(weight.detach(), -LR * 0.25 * grad.sign())


@pytest.mark.parametrize(
    ("scale", "factor"),
    [("none", 1.0), ("shape", 2**0.5), ("rms", 0.2 * 8**0.5)],
)
def test_spectral_descent_svd_is_polar_factor_times_scale(scale: Any, factor: float) -> None:
    """8x4 weight: update ``-lr · s · UVᵀ`` with ``s`` = 1, ``sqrt(rows/cols)`` or ``0.2·sqrt(max)``."""
    weight = nn.Parameter(torch.zeros(8, 4))
    config = SpectralDescentPreconditionerConfig(
        orthogonalization_config=SVDOrthogonalizationConfig(), scale=scale
    )
    optimizer = Shampoo([weight], lr=LR, betas=(0.0, 1.0), preconditioner_config=config)
    grad = _randn(8, 4, seed=5)
    weight.grad = grad.clone()
    optimizer.step()
    (plan,) = optimizer.buckets
    assert plan.block_shape == (8, 4)
    torch.testing.assert_close(weight.detach(), -LR * factor * _polar(grad))


def test_spectral_descent_orthogonalizes_each_block() -> None:
    """A [12, 5] weight in blocks of at most 5 rows: each block gets its own polar factor."""
    weight = nn.Parameter(torch.zeros(12, 5))
    optimizer = Shampoo(
        [weight],
        lr=LR,
        betas=(0.0, 1.0),
        max_preconditioner_dim=5,
        preconditioner_config=SpectralDescentPreconditionerConfig(
            orthogonalization_config=SVDOrthogonalizationConfig(), scale="none"
        ),
    )
    grad = _randn(12, 5, seed=6)
    weight.grad = grad.clone()
    optimizer.step()
    for rows in (slice(0, 5), slice(5, 10), slice(10, 12)):
        torch.testing.assert_close(weight.detach()[rows], -LR * _polar(grad[rows]))


def test_newton_schulz_is_close_to_the_polar_factor() -> None:
    """The quintic Newton–Schulz map keeps the singular vectors and maps singular values into
    roughly [0.7, 1.2]: close to ``UVᵀ``, not equal."""
    weight = nn.Parameter(torch.zeros(16, 8))
    config = SpectralDescentPreconditionerConfig(
        orthogonalization_config=NewtonSchulzOrthogonalizationConfig(), scale="none"
    )
    optimizer = Shampoo([weight], lr=1.0, betas=(0.0, 1.0), preconditioner_config=config)
    grad = _randn(16, 8, seed=7)
    weight.grad = grad.clone()
    optimizer.step()
    update = -weight.detach().double()
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    in_grad_basis = u.mT @ update @ vh.mT  # diagonal if the singular vectors are kept
    off_diagonal = in_grad_basis - torch.diag_embed(in_grad_basis.diagonal())
    assert off_diagonal.norm() < 1e-4 * in_grad_basis.norm()
    singular_values = in_grad_basis.diagonal()
    assert bool((singular_values > 0.6).all()) and bool((singular_values < 1.25).all()), singular_values
    polar = u @ vh
    assert (update - polar).norm() < 0.3 * polar.norm()


def test_spectral_descent_rejects_one_dim_parameter_by_name() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"bias") as info:
        Shampoo(model.named_parameters(), preconditioner_config=SVD)
    assert "weight" not in str(info.value)
    # Without names the message still points at the parameter (by index).
    with pytest.raises(ValueError, match=r"param1"):
        Shampoo(list(model.parameters()), preconditioner_config=SVD)


def test_spectral_descent_merges_conv_weight_to_two_dims() -> None:
    """[out, in, k, k] = [8, 3, 3, 3] becomes one 8x27 block, orthogonalized as a matrix."""
    conv = nn.Conv2d(3, 8, kernel_size=3, bias=False)
    optimizer = Shampoo(conv.parameters(), lr=LR, betas=(0.0, 1.0), preconditioner_config=SVD)
    (plan,) = optimizer.buckets
    assert plan.block_shape == (8, 27)
    grad = _randn(8, 3, 3, 3, seed=8)
    before = conv.weight.detach().clone()
    conv.weight.grad = grad.clone()
    optimizer.step()
    # "shape" scale: sqrt(max(1, 8/27)) = 1.
    expected = -LR * _polar(grad.reshape(8, 27)).reshape(8, 3, 3, 3)
    torch.testing.assert_close(conv.weight.detach() - before, expected)
