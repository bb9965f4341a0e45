"""Iterate averaging under a Trainer: validation and checkpoints see the averaged weights,
training continues from the train point bitwise, and a run resumed from a checkpoint ends
where the uninterrupted run does (bitwise)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo import IterateAveragingSwitch, ScheduleFreeConfig, Shampoo, ShampooCallback
from lightning_shampoo.averaging import train_to_eval_

MU_Y = 0.9


class Regression(pl.LightningModule):
    """A small MLP on random regression data; records what training and validation see."""

    def __init__(self, batch_size: int = 8, own_shampoo: bool = False) -> None:
        super().__init__()
        self.batch_size, self.own_shampoo = batch_size, own_shampoo
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.train_seen: list[list[Tensor]] = []
        self.val_seen: list[dict[str, Any]] = []

    def _params(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.net.parameters()]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.train_seen.append(self._params())
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.trainer.optimizers[0]
        assert isinstance(optimizer, Shampoo) and not optimizer.training
        keys = optimizer.block_keys()
        self.val_seen.append(
            {
                "params": self._params(),
                "y": [optimizer.block_state(k)["moments.averaging_y"].clone() for k in keys],
                "z": [optimizer.block_state(k)["moments.averaging_z"].clone() for k in keys],
            }
        )

    def configure_optimizers(self) -> Any:
        if self.own_shampoo:  # with IterateAveragingSwitch in the trainer instead of the drop-in
            return Shampoo(
                self.parameters(),
                lr=1e-2,
                iterate_averaging_config=ScheduleFreeConfig(train_interp_coeff=MU_Y),
            )
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return _loader(seed=1, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return _loader(seed=2)


def _loader(seed: int, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(48, 6, generator=g), torch.randn(48, 3, generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _trainer(tmp_path: Path, drop_in: bool = True, **kwargs: Any) -> pl.Trainer:
    callback: pl.Callback = IterateAveragingSwitch()
    if drop_in:
        callback = ShampooCallback(
            "shampoo",
            precondition_frequency=2,
            iterate_averaging_config=ScheduleFreeConfig(train_interp_coeff=MU_Y),
            frequency_scheduler=False,
            health_monitor=False,
        )
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    options["callbacks"] = [callback, *options.get("callbacks", [])]
    return pl.Trainer(**options)


def _x_of(y: list[Tensor], z: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """The averaged weights from the block state (here every parameter is one block)."""
    x = [t.clone() for t in y]
    train_to_eval_(x, z, MU_Y)
    return [t.view_as(p) for t, p in zip(x, params)]


@pytest.mark.parametrize("drop_in", [True, False], ids=["shampoo-callback", "switch"])
def test_validation_sees_the_averaged_weights(tmp_path: Path, drop_in: bool) -> None:
    module = Regression(own_shampoo=not drop_in)
    trainer = _trainer(tmp_path, drop_in=drop_in, max_epochs=1, val_check_interval=3, limit_val_batches=1)
    trainer.fit(module)
    assert len(module.val_seen) == 2 and len(module.train_seen) == 6
    for seen in module.val_seen:
        expected = _x_of(seen["y"], seen["z"], seen["params"])
        for p, x, y in zip(seen["params"], expected, seen["y"]):
            torch.testing.assert_close(p, x, rtol=1e-6, atol=1e-7)
            assert not torch.equal(p.view(-1), y.view(-1))
    # training after the first validation restarts from the saved train point, bitwise
    for p, y in zip(module.train_seen[3], module.val_seen[0]["y"]):
        assert torch.equal(p.view(-1), y.view(-1))
    # the fitted module holds the averaged weights (as the last validation saw them)
    for p, seen in zip(module.net.parameters(), module.val_seen[-1]["params"]):
        assert torch.equal(p.detach(), seen)


def test_checkpoints_hold_the_averaged_weights_and_resume_bitwise(tmp_path: Path) -> None:
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    full = Regression(batch_size=12)  # 4 steps an epoch
    trainer = _trainer(tmp_path / "full", max_epochs=2, limit_val_batches=0, callbacks=[every_epoch])
    trainer.fit(full)
    saved = sorted((tmp_path / "ckpt").glob("epoch=0-step=4.ckpt"))
    assert len(saved) == 1
    checkpoint = torch.load(saved[0], weights_only=True)
    (optimizer_state,) = checkpoint["optimizer_states"]
    assert optimizer_state["param_groups"][0]["train_mode"] is False
    weights = [checkpoint["state_dict"][f"net.{n}"] for n in ("0.weight", "0.bias", "2.weight", "2.bias")]
    rows = [optimizer_state["state"][i] for i in range(4)]
    x = _x_of(
        [r["block_0.moments.averaging_y"] for r in rows],
        [r["block_0.moments.averaging_z"] for r in rows],
        weights,
    )
    for w, expected, train_point in zip(weights, x, full.train_seen[4]):
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(w, train_point)
    # the first batch of epoch 2 was trained from the train point, not from the checkpoint's weights
    for r, train_point in zip(rows, full.train_seen[4]):
        assert torch.equal(r["block_0.moments.averaging_y"].view_as(train_point), train_point)

    resumed = Regression(batch_size=12)
    trainer = _trainer(tmp_path / "resumed", max_epochs=2, limit_val_batches=0)
    trainer.fit(resumed, ckpt_path=saved[0])
    assert len(resumed.train_seen) == 4
    for p, q in zip(resumed.net.parameters(), full.net.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("hook", ["on_validation_start", "on_test_start", "on_predict_start", "on_train_end"])
def test_evaluation_hooks_switch_to_eval(hook: str) -> None:
    module = Regression()
    optimizer = Shampoo(module.parameters(), lr=0.01, iterate_averaging_config=ScheduleFreeConfig())
    plain = Shampoo(nn.Linear(2, 2).parameters(), lr=0.01)
    trainer: Any = SimpleNamespace(optimizers=[plain, optimizer])
    switch = IterateAveragingSwitch()
    getattr(switch, hook)(trainer, module)
    assert not optimizer.training and plain.training
    switch.on_train_batch_start(trainer, module, None, 0)
    assert optimizer.training
