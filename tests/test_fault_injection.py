"""Fault injection (issue 16): eigh failures, non-finite, zero, huge and missing gradients at once.

For every preset and a translated AdamW, in a plain loop and once through ``Trainer`` with
``ShampooCallback()``: no crash, no non-finite value in the weights or in any state tensor (health
figures aside, see ``_state_checks``), and the health counters account for every injected
non-finite gradient.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import small_model
from torch import Tensor, nn

from lightning_shampoo import RootInvShampooPreconditionerConfig, Shampoo, ShampooCallback, configure_shampoo
from lightning_shampoo._state_checks import nonfinite_entries
from lightning_shampoo._translate import translate_optimizer

_REAL_EIGH = torch.linalg.eigh
STEPS = 100
NONFINITE_STEPS = {37: float("nan"), 71: float("inf")}  # ~1% of steps each
POISONED = "fc1.weight"


class FaultyEigh:
    """``torch.linalg.eigh`` failing on 10% of calls: raising on every 20th (from the 4th), returning
    nan on every 20th (from the 14th)."""

    def __init__(self) -> None:
        self.calls = 0
        self.faults = 0

    def __call__(self, a: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls % 20 == 3:
            self.faults += 1
            raise torch.linalg.LinAlgError("injected eigh failure")
        values, vectors = _REAL_EIGH(a, *args, **kwargs)
        if self.calls % 20 == 13:
            self.faults += 1
            return torch.full_like(values, float("nan")), torch.full_like(vectors, float("nan"))
        return values, vectors


def _translated_adamw(model: nn.Module) -> Shampoo:
    source = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    options = {
        "preconditioner_config": RootInvShampooPreconditionerConfig(),
        "precondition_frequency": 3,
        "epsilon": 1e-12,
        "skip_preconditioning_rank_lt": 2,
    }
    return translate_optimizer(source, options, names={id(p): n for n, p in model.named_parameters()})


def _preset(name: str, **kwargs: Any) -> Callable[[nn.Module], Shampoo]:
    def make(model: nn.Module) -> Shampoo:
        optimizer = configure_shampoo(model, name, lr=1e-2, weight_decay=0.01, **kwargs)
        assert isinstance(optimizer, Shampoo)
        return optimizer

    return make


OPTIMIZERS: dict[str, Callable[[nn.Module], Shampoo]] = {
    "shampoo": _preset("shampoo", precondition_frequency=3),
    "eigen": _preset("eigen", precondition_frequency=3),
    "soap": _preset("soap", precondition_frequency=3),
    "kl_shampoo": _preset("kl_shampoo", precondition_frequency=3),
    "psgd_kron": _preset("psgd_kron"),
    "adam": _preset("adam"),
    "adamw_translated": _translated_adamw,
}


def _blocks_of(optimizer: Shampoo, name: str) -> int:
    return sum(1 for r in optimizer.health() if r.param_name == name)


def _assert_finite(optimizer: Shampoo, model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert nonfinite_entries(optimizer.state_dict()) == []


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_plain_loop_survives_every_fault_at_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    eigh = FaultyEigh()
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    model = small_model(0)
    optimizer = OPTIMIZERS[name](model)
    named = dict(model.named_parameters())
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(2)
    expected_nonfinite = 0
    for step in range(1, STEPS + 1):
        scale = 0.0 if step % 20 == 7 else 1e6 if step % 25 == 11 else 1.0
        for pname, p in named.items():
            missing = rng.random() < 0.5 and not (step in NONFINITE_STEPS and pname == POISONED)
            p.grad = None if missing else scale * torch.randn(p.shape, generator=gen)
        if step in NONFINITE_STEPS:
            named[POISONED].grad.fill_(NONFINITE_STEPS[step])  # type: ignore[union-attr]
            expected_nonfinite += _blocks_of(optimizer, POISONED)
        optimizer.step()
    _assert_finite(optimizer, model)
    assert expected_nonfinite > 0
    assert sum(r.nonfinite_count for r in optimizer.health()) == expected_nonfinite
    if name not in ("psgd_kron", "adam"):  # the presets that refresh through eigh
        assert eigh.faults >= 2, eigh.calls


class _FaultyModule(pl.LightningModule):
    """A tiny MLP whose second branch is used on every other batch (missing gradients), and whose
    gradients are poisoned, zeroed or blown up on chosen steps after the backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.side = nn.Linear(6, 3)
        self.injected = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.fc2(torch.tanh(self.fc1(x)))
        if batch_idx % 2:
            out = out + self.side(x)
        return nn.functional.mse_loss(out, y)

    def on_after_backward(self) -> None:
        step = self.trainer.global_step + 1
        if step in NONFINITE_STEPS:
            assert self.fc1.weight.grad is not None
            self.fc1.weight.grad.fill_(NONFINITE_STEPS[step])
            self.injected += 1
        elif step % 10 == 3:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        elif step % 10 == 6:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e6)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_trainer_with_shampoo_callback_survives_every_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    eigh = FaultyEigh()
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    torch.manual_seed(0)
    module = _FaultyModule()
    data = torch.utils.data.TensorDataset(torch.randn(8 * 80, 6), torch.randn(8 * 80, 3))
    callback = ShampooCallback(precondition_frequency=4)
    trainer = pl.Trainer(
        max_steps=80,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 80
    (optimizer,) = callback.optimizers
    _assert_finite(optimizer, module)
    assert module.injected == len(NONFINITE_STEPS)
    records = optimizer.health()
    blocks = sum(1 for r in records if r.param_name == "fc1.weight")
    assert sum(r.nonfinite_count for r in records) == len(NONFINITE_STEPS) * blocks
    assert eigh.faults >= 2, eigh.calls
