"""``ShampooCallback()`` added to existing Lightning projects (issue 13): the health monitor's
logging cadence, a second drop-in, errors from the wrapped optimizer's values, runs that stop
before the first refresh, and ``precision="64-true"`` — each through a real ``Trainer`` on CPU
(2-rank DDP in a subprocess, launched by ``torch.distributed.run``)."""

from __future__ import annotations

import json
import logging
import textwrap
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import cpu_trainer, digits, figures, read_csv_metrics, run_two_ranks
from torch import nn

from lightning_shampoo import (
    PreconditionerHealthMonitor,
    RootInvShampooPreconditionerConfig,
    Shampoo,
    ShampooCallback,
)
from lightning_shampoo.demo import DigitsClassifier

MODEL = {"channels": 4, "hidden": 16}


def health_rows(trainer: pl.Trainer, key: str = "shampoo/blocks") -> list[dict[str, float]]:
    rows = read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv")
    return [r for r in rows if key in r]


# ----------------------------------------------------------------------- item 3: logging cadence


def test_drop_in_health_follows_the_trainers_cadence_in_a_40_step_run(tmp_path: Path) -> None:
    """``ShampooCallback()`` on a module returning AdamW, ``Trainer(log_every_n_steps=10)``:
    health and fallback counters at steps 10, 20, 30, 40 (not the monitor's old fixed 50, so a
    40-step run logs), no warning about the monitor the user never created, no stale copies."""
    callback = ShampooCallback()
    trainer = cpu_trainer(
        tmp_path, max_steps=40, log_every_n_steps=10, logger=CSVLogger(tmp_path), callbacks=[callback]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitsClassifier(**MODEL), datamodule=digits())
    ours = [str(w.message) for w in caught if "Monitor" in str(w.message) or "shampoo" in str(w.message)]
    assert ours == []
    monitor = callback.health_monitor
    assert monitor is not None and monitor.log_every_n_steps is None  # follows the trainer
    assert [h["step"] for h in monitor.history] == [10.0, 20.0, 30.0, 40.0]
    rows = health_rows(trainer)
    assert [int(r["step"]) + 1 for r in rows] == [10, 20, 30, 40]  # CSV steps are 0-based
    assert rows[-1]["shampoo/blocks"] == len(trainer.optimizers[0].block_keys())
    # the latest figures are in callback_metrics (for EarlyStopping / ModelCheckpoint(monitor=...))
    assert float(trainer.callback_metrics["shampoo/condition_number_max"]) == pytest.approx(
        rows[-1]["shampoo/condition_number_max"]
    )
    counters = health_rows(trainer, "shampoo/fallback_switches")
    assert [int(r["step"]) + 1 for r in counters] == [10, 20, 30, 40]
    # the loss Lightning logs at the same cadence sits on the same steps
    loss_steps = [int(r["step"]) + 1 for r in health_rows(trainer, "train/loss_step")]
    assert [s for s in loss_steps if s % 10 == 0] == [10, 20, 30, 40]


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from lightning.pytorch.loggers import CSVLogger
    from lightning_helpers import cpu_trainer, digits

    from lightning_shampoo import ShampooCallback
    from lightning_shampoo.demo import DigitsClassifier

    out = Path(sys.argv[1])
    callback = ShampooCallback()
    trainer = cpu_trainer(
        out, strategy="ddp", devices=2, max_steps=20, log_every_n_steps=5, logger=CSVLogger(out),
        callbacks=[callback],
    )
    trainer.fit(DigitsClassifier(channels=4, hidden=16), datamodule=digits(batch_size=16))
    history = list(callback.health_monitor.history)
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(history))
    """
)


def test_drop_in_health_cadence_under_two_rank_ddp(tmp_path: Path) -> None:
    """The same under plain ``"ddp"`` (the drop-in shards the blocks): identical figures on both
    ranks, written once per logging step of ``Trainer(log_every_n_steps=5)``."""
    run_two_ranks(DDP_SCRIPT, tmp_path)
    histories = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [h["step"] for h in histories[0]] == [5.0, 10.0, 15.0, 20.0]
    assert json.dumps(histories[0], sort_keys=True) == json.dumps(histories[1], sort_keys=True)
    rows = read_csv_metrics(next(tmp_path.glob("lightning_logs/version_*/metrics.csv")))
    logged = [r for r in rows if "shampoo/blocks" in r]  # rank 0 writes, once per logging step
    assert [int(r["step"]) + 1 for r in logged] == [5, 10, 15, 20]
    counters = [r for r in rows if "shampoo/fallback_switches" in r]
    assert [int(r["step"]) + 1 for r in counters] == [5, 10, 15, 20]
    for row, entry in zip(logged, histories[0], strict=True):
        assert figures(row) == figures(entry)
    assert "shampoo/condition_number_max" in logged[-1]  # refreshed by then


# ------------------------------------------------------------------ item 4: a user's surprises


class NoOptimizer(pl.LightningModule):
    """A module without ``configure_optimizers`` (the drop-in gives it ``configure_shampoo``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsClassifier(**MODEL).net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("model", [DigitsClassifier, NoOptimizer], ids=["AdamW", "no-configure_optimizers"])
def test_a_second_drop_in_is_refused_at_setup(tmp_path: Path, model: type) -> None:
    module = model(**MODEL) if model is DigitsClassifier else model()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[ShampooCallback(), ShampooCallback("soap")])
    with pytest.raises(ValueError, match=r"holds 2 ShampooCallback instances; keep one"):
        trainer.fit(module, datamodule=digits())
    assert "configure_optimizers" not in module.__dict__  # the module is handed back unwrapped
    assert not any(isinstance(o, Shampoo) for o in trainer.optimizers)


class WithSGD(DigitsClassifier):
    """The demo CNN returning SGD with per-group momentum (group 1: the given value)."""

    def __init__(self, momentum: float) -> None:
        super().__init__(**MODEL)
        self.momentum = momentum

    def configure_optimizers(self) -> torch.optim.Optimizer:
        weights = [p for p in self.parameters() if p.ndim > 1]
        biases = [p for p in self.parameters() if p.ndim <= 1]
        return torch.optim.SGD(
            [{"params": biases}, {"params": weights, "momentum": self.momentum}], lr=0.1, momentum=0.5
        )


def test_an_error_from_the_wrapped_optimizers_values_says_so(tmp_path: Path) -> None:
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[ShampooCallback()])
    with pytest.raises(ValueError) as raised:
        trainer.fit(WithSGD(momentum=1.0), datamodule=digits())
    message = str(raised.value)
    assert message.startswith("SGD param group 1: momentum must be") and "[0, 1), got 1.0" in message
    assert "wrapped torch.optim.SGD" in message and "configure_optimizers" in message
    # the same values with a valid momentum train (the error was the value, not the setup)
    cpu_trainer(tmp_path, max_steps=2, callbacks=[ShampooCallback()]).fit(
        WithSGD(momentum=0.9), datamodule=digits()
    )


def test_a_run_shorter_than_the_first_refresh_says_why_it_never_preconditioned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        trainer = cpu_trainer(tmp_path, max_steps=5, callbacks=[ShampooCallback()])
        trainer.fit(DigitsClassifier(**MODEL), datamodule=digits())
    assert trainer.optimizers[0].param_groups[0]["start_preconditioning_step"] == 10
    table = capsys.readouterr().out
    assert "never (first refresh at step 10)" in table
    expected = "the run stopped at step 5, before the first refresh at step 10"
    assert f"no block was preconditioned: {expected}" in " ".join(table.split())
    notes = [r.getMessage() for r in caplog.records if "no block was preconditioned" in r.getMessage()]
    assert notes == [
        f"Shampoo: no block was preconditioned: {expected}; every block took its grafting "
        "direction; train longer or lower start_preconditioning_step"
    ]
    # a run past the first refresh reports staleness, and no note
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = cpu_trainer(tmp_path, max_steps=12, callbacks=[ShampooCallback()])
        trainer.fit(DigitsClassifier(**MODEL), datamodule=digits())
    table = capsys.readouterr().out
    assert "never" not in table and "no block was preconditioned" not in table
    assert not [r for r in caplog.records if "no block was preconditioned" in r.getMessage()]


@pytest.mark.parametrize("preconditioner", ["shampoo", "eigen", "kl_shampoo", "soap"])
def test_float64_training_keeps_shampoo_state_in_float64(tmp_path: Path, preconditioner: str) -> None:
    callback = ShampooCallback(preconditioner, precondition_frequency=2, health_monitor=False)
    trainer = cpu_trainer(tmp_path, max_steps=4, precision="64-true", callbacks=[callback])
    module = DigitsClassifier(**MODEL)
    trainer.fit(module, datamodule=digits())
    assert all(p.dtype == torch.float64 for p in module.parameters())
    optimizer = trainer.optimizers[0]
    tensors = {
        f"{key}/{part}/{name}": t
        for key, state in optimizer.state.items()
        for part in ("precond", "graft")
        for name, t in state[part].items()
        if t.is_floating_point()
    }
    assert any("/precond/factor." in k for k in tensors)  # the Kronecker factors are there
    assert {k: t.dtype for k, t in tensors.items()} == dict.fromkeys(tensors, torch.float64)
    assert all(h.last_refresh_step == 4 for h in optimizer.health() if h.condition_numbers)


def test_an_explicit_state_dtype_is_kept_under_float64(tmp_path: Path) -> None:
    """As in Distributed Shampoo, a dtype given explicitly is used as given."""
    config = RootInvShampooPreconditionerConfig(factor_matrix_dtype=torch.float32)
    callback = ShampooCallback(config, precondition_frequency=2, health_monitor=False)
    trainer = cpu_trainer(tmp_path, max_steps=2, precision="64-true", callbacks=[callback])
    trainer.fit(DigitsClassifier(**MODEL), datamodule=digits())
    precond = [state["precond"] for state in trainer.optimizers[0].state.values()]
    factors = [t.dtype for p in precond for k, t in p.items() if k.startswith("factor.")]
    roots = [t.dtype for p in precond for k, t in p.items() if k.startswith("root.")]
    assert factors and set(factors) == {torch.float32} and set(roots) == {torch.float64}


def test_the_health_monitor_added_by_the_drop_in_is_not_the_users(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's own monitor replaces the drop-in's; the drop-in's knows it was added, and where it
    finds nothing to monitor it notes that (info) instead of warning about a component the user
    never created."""
    callback = ShampooCallback()
    mine = PreconditionerHealthMonitor(log_every_n_steps=3, print_table=False)
    trainer = cpu_trainer(tmp_path, max_steps=3, callbacks=[callback, mine])
    trainer.fit(DigitsClassifier(**MODEL), datamodule=digits())
    monitors = [c for c in trainer.callbacks if isinstance(c, PreconditionerHealthMonitor)]
    assert monitors == [mine] and mine.added_by is None and len(mine.history) == 1
    assert callback.health_monitor is not None and callback.health_monitor.added_by is None  # unused
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[callback])
    trainer.fit(DigitsClassifier(**MODEL), datamodule=digits())
    assert callback.health_monitor.added_by == "ShampooCallback"
    monitor = PreconditionerHealthMonitor(log_every_n_steps=1)
    monitor.added_by = "ShampooCallback"
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.filterwarnings("error", message=".*no Shampoo optimizer.*")
        plain = DigitsClassifier(**MODEL)  # AdamW, no drop-in: nothing to monitor
        cpu_trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(plain, datamodule=digits())
    notes = [r.getMessage() for r in caplog.records if "no Shampoo optimizer" in r.getMessage()]
    assert notes == ["ShampooCallback's health monitor: no Shampoo optimizer in this run"]
    assert not monitor.history
