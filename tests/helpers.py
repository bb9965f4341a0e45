"""Small shared test helpers: a model with every parameter kind and a side-by-side trainer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn


class SmallNet(nn.Module):
    """Conv (4-D weight) → MLP with biases, plus a 3-D parameter used in a trilinear term."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)  # [3, 2, 3, 3] on 4x4 inputs → 3x2x2
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 4)
        self.cube = nn.Parameter(0.3 * torch.randn(2, 5, 4))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        trilinear = torch.einsum("bi,bj,ijk->bk", x[:, :, 0, :2].sum(1), h[:, :5], self.cube)
        return self.fc2(h) + trilinear


def small_model(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet()


def make_batches(steps: int, seed: int = 1, batch: int = 8) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 2, 4, 4, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(steps)
    ]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]) -> None:
    """Plain loop (closure form, as Lightning calls ``step``) over fixed batches with an MSE loss."""
    for x, y in batches:

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)


def side_by_side(
    make_ours: Callable[[nn.Module], torch.optim.Optimizer],
    make_reference: Callable[[nn.Module], torch.optim.Optimizer],
    steps: int = 20,
    seed: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """Train two copies of the same model on the same batches and check that both moved every
    parameter (a comparison of untouched parameters would prove nothing); return (ours, reference)."""
    ours = small_model(seed)
    initial = copy.deepcopy(ours)
    reference = copy.deepcopy(ours)
    batches = make_batches(steps)
    train(ours, make_ours(ours), batches)
    train(reference, make_reference(reference), batches)
    for (name, p), (_, p0) in zip(ours.named_parameters(), initial.named_parameters(), strict=True):
        assert (p - p0).abs().max() > 1e-4, f"{name} did not move"
    return ours, reference


def assert_same_parameters(ours: nn.Module, reference: nn.Module, **tolerances: float) -> None:
    """``assert_close`` on every parameter (default tolerances unless given), naming the parameter."""
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tolerances)


_SYMMETRIC = ("factor.", "root.", "reference.")


def is_symmetric(key: str) -> bool:
    """Whether a state key (``precond.factor.0``, ``block_3.precond.root.1``, …) names a symmetric
    matrix, which ``use_symmetric_packing`` stores as its upper triangle."""
    return any(f".{s}" in f".{key}" for s in _SYMMETRIC)


def row_full(value: Tensor) -> Tensor:
    """One block's symmetric state as a ``[d, d]`` matrix (unpacked if stored packed)."""
    from lightning_shampoo.linalg.packing import unpack

    return unpack(value) if value.ndim == 1 else value


def bucket_full(value: Tensor) -> Tensor:
    """A bucket's symmetric state as ``[n, d, d]`` (unpacked if stored packed ``[n, d(d+1)/2]``)."""
    from lightning_shampoo.linalg.packing import unpack

    return unpack(value) if value.ndim == 2 else value
