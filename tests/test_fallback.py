"""SGDFallback in real Trainer.fit runs on CPU: injected eigh failures switch blocks to the
fallback and back, retries raise epsilon, give-up, and the state's checkpoint round-trip."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import (
    ShampooDigits,
    cpu_trainer,
    digits,
    finite_params,
    read_csv_metrics,
)

from lightning_shampoo import SGDFallback

WEIGHTS = ["net.0.weight", "net.2.weight", "net.6.weight", "net.8.weight"]


class EighFailures(pl.Callback):
    """``torch.linalg.eigh`` raises during the optimizer steps in ``steps`` (1-based)."""

    def __init__(self, steps: range) -> None:
        self.steps, self.active, self.real = steps, False, torch.linalg.eigh

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.active = trainer.global_step + 1 in self.steps

    def eigh(self, *args: Any, **kwargs: Any) -> Any:
        if self.active:
            raise torch.linalg.LinAlgError("injected eigh failure")
        return self.real(*args, **kwargs)


class Recorder(pl.Callback):
    """After every step: each weight's fallback mode and epsilon scale, and whether params are finite."""

    def __init__(self) -> None:
        self.modes: dict[int, dict[str, str | None]] = {}
        self.scales: dict[int, dict[str, float]] = {}
        self.finite: dict[int, bool] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        health = {h.param_name: h for h in trainer.optimizers[0].health()}
        step = trainer.global_step
        self.modes[step] = {name: health[name].fallback for name in WEIGHTS}
        self.scales[step] = {name: health[name].epsilon_scale for name in WEIGHTS}
        self.finite[step] = finite_params(pl_module)


def fit_with_failures(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fallback: SGDFallback,
    failing: range,
    steps: int,
    **kw: Any,
) -> tuple[pl.Trainer, Recorder]:
    failures, recorder = EighFailures(failing), Recorder()
    monkeypatch.setattr(torch.linalg, "eigh", failures.eigh)
    trainer = cpu_trainer(
        tmp_path,
        max_steps=steps,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path),
        callbacks=[failures, fallback, recorder],
    )
    trainer.fit(ShampooDigits(**kw), datamodule=digits())
    return trainer, recorder


@pytest.mark.parametrize(("grafting", "mode"), [(True, "grafting"), (False, "sgd")])
def test_injected_eigh_failure_switches_blocks_and_they_recover(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    grafting: bool,
    mode: str,
) -> None:
    fallback = SGDFallback(
        target="grafting", retry_after=4, epsilon_multiplier=10.0, max_retries=5, check_every_n_steps=2
    )
    with caplog.at_level(logging.INFO, logger="lightning_shampoo"):
        trainer, seen = fit_with_failures(
            tmp_path, monkeypatch, fallback, failing=range(5, 11), steps=16, grafting=grafting
        )
    # refreshes fail at steps 5..10; the check at step 6 switches every factored block;
    # the retry requested at the step-10 check runs at step 11 (no injection any more) with
    # epsilon x10 and succeeds; the check at step 12 returns the blocks to preconditioning.
    for step in range(1, 17):
        expected = mode if 6 <= step < 12 else None
        assert seen.modes[step] == dict.fromkeys(WEIGHTS, expected), step
    assert all(seen.finite.values())
    assert seen.scales[16] == dict.fromkeys(WEIGHTS, 10.0)
    assert fallback.counters == {"switches": 4, "retries": 4, "recoveries": 4, "gave_up": 0}
    assert fallback.records == {}
    health = {h.param_name: h for h in trainer.optimizers[0].health()}
    for name in WEIGHTS:
        assert health[name].failure_count == 6  # one per failed refresh, steps 5..10
        assert health[name].last_refresh_step == 16
    # logged: every switch and recovery (python logging) and the counters (the CSV logger)
    switched = [r for r in caplog.records if "switched to" in r.getMessage()]
    assert len(switched) == 4 and all(f"to {mode} fallback at step 6" in r.getMessage() for r in switched)
    assert all(r.levelno == logging.WARNING for r in switched)
    assert (" has no grafting_config" in switched[0].getMessage()) == (not grafting)
    assert sum("preconditioned again after 1 retry" in r.getMessage() for r in caplog.records) == 4
    rows = [
        r
        for r in read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv")
        if "shampoo/blocks_in_fallback" in r
    ]
    by_step = {int(r["step"]) + 1: r for r in rows}  # CSV steps are 0-based
    assert [by_step[s]["shampoo/blocks_in_fallback"] for s in (4, 6, 8, 10, 12, 14)] == [0, 4, 4, 4, 0, 0]
    assert by_step[6]["shampoo/fallback_switches"] == 4 and by_step[16]["shampoo/fallback_recoveries"] == 4


def test_ill_conditioned_blocks_give_up_after_max_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # every damped factor here has κ > 1.5, so switches happen and every retry fails the test
    fallback = SGDFallback(
        target="sgd", max_condition_number=1.5, retry_after=2, max_retries=2, check_every_n_steps=1
    )
    with caplog.at_level(logging.INFO, logger="lightning_shampoo"):
        _, seen = fit_with_failures(tmp_path, monkeypatch, fallback, failing=range(0), steps=10)
    # step 1 switch; retries at 3 and 6 (each judged failed one step later); gives up at 7
    assert seen.modes[1] == dict.fromkeys(WEIGHTS, "sgd") and seen.modes[10] == dict.fromkeys(WEIGHTS, "sgd")
    assert seen.scales[2] == dict.fromkeys(WEIGHTS, 1.0)
    assert seen.scales[3] == dict.fromkeys(WEIGHTS, 10.0)
    assert seen.scales[10] == dict.fromkeys(WEIGHTS, 100.0)
    assert fallback.counters == {"switches": 4, "retries": 8, "recoveries": 0, "gave_up": 4}
    assert all(r.gave_up and r.retries == 2 for r in fallback.records.values())
    assert all(seen.finite.values())
    gave_up = [r for r in caplog.records if "stays in sgd fallback: 2 retries failed" in r.getMessage()]
    assert len(gave_up) == 4
    assert "condition number" in fallback.records[(0, 0, 0)].reason


def test_fallback_state_survives_a_checkpoint_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = range(3, 10)

    def options() -> SGDFallback:
        return SGDFallback(retry_after=3, max_retries=3, check_every_n_steps=1)

    def run(
        root: Path, callbacks: list[pl.Callback], ckpt: str | None = None
    ) -> tuple[pl.Trainer, pl.LightningModule]:
        failures = EighFailures(failing)
        monkeypatch.setattr(torch.linalg, "eigh", failures.eigh)
        pl.seed_everything(0)
        model = ShampooDigits()
        saving = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        trainer = cpu_trainer(
            root,
            max_steps=16,
            limit_train_batches=4,
            callbacks=[failures, *callbacks],
            enable_checkpointing=saving,
        )
        trainer.fit(model, datamodule=digits(), ckpt_path=ckpt)
        return trainer, model

    class Snapshot(pl.Callback):
        def __init__(self, fallback: SGDFallback, at: int) -> None:
            self.fallback, self.at = fallback, at
            self.state: dict[str, Any] | None = None

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == self.at:
                self.state = copy.deepcopy(self.fallback.state_dict())

    # uninterrupted run, saving a checkpoint at step 8 (end of epoch 2) while blocks are in fallback
    straight = options()
    snapshot = Snapshot(straight, 8)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    _, model_a = run(tmp_path / "a", [straight, snapshot, saver])
    path = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["callbacks"]["SGDFallback"]
    assert saved == snapshot.state
    assert len(saved["records"]) == 4 and all(r["retries"] >= 1 for r in saved["records"])

    # resume with a fresh callback: its state is the saved one, and the run ends where the straight one did
    resumed = options()

    class Restored(pl.Callback):
        state: dict[str, Any] | None = None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.state = copy.deepcopy(resumed.state_dict())

    restored = Restored()
    _, model_b = run(tmp_path / "b", [resumed, restored], ckpt=str(path))
    assert restored.state == saved
    assert resumed.state_dict() == straight.state_dict()
    assert straight.counters["recoveries"] == 4
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b)


def test_rejects_bad_arguments() -> None:
    for kwargs, name in [
        ({"target": "adam"}, "target"),
        ({"max_condition_number": 1.0}, "max_condition_number"),
        ({"retry_after": 0}, "retry_after"),
        ({"epsilon_multiplier": 0.5}, "epsilon_multiplier"),
        ({"max_retries": -1}, "max_retries"),
        ({"check_every_n_steps": 0}, "check_every_n_steps"),
    ]:
        with pytest.raises(ValueError, match=name):
            SGDFallback(**kwargs)


def test_no_retries_means_staying_in_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fallback = SGDFallback(max_retries=0, check_every_n_steps=1)
    _, seen = fit_with_failures(tmp_path, monkeypatch, fallback, failing=range(2, 3), steps=6)
    assert seen.modes[1] == dict.fromkeys(WEIGHTS, None)
    assert all(seen.modes[s] == dict.fromkeys(WEIGHTS, "grafting") for s in range(2, 7))
    assert fallback.counters == {"switches": 4, "retries": 0, "recoveries": 0, "gave_up": 4}
    assert all(seen.finite.values())


@pytest.mark.parametrize(("every", "expected"), [(None, [4, 8, 12]), (6, [6, 12])])
def test_counters_reach_the_loggers_on_their_logging_steps_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int | None, expected: list[int]
) -> None:
    """Checks run on their own cadence (every 3 steps); the counters are written to the loggers
    every ``log_every_n_steps`` (``None``: the Trainer's, 4) and on no other step, without going
    through ``pl_module.log`` (which would repeat stale values on the trainer's logging steps)."""
    written: list[int] = []
    original = CSVLogger.log_metrics

    def log_metrics(self: CSVLogger, metrics: dict, step: int | None = None) -> None:
        if "shampoo/fallback_switches" in metrics:
            written.append(step)
        original(self, metrics, step)

    monkeypatch.setattr(CSVLogger, "log_metrics", log_metrics)
    monkeypatch.setattr(
        pl.LightningModule, "log_dict", lambda *a, **k: pytest.fail("the fallback must not use log_dict")
    )
    fallback = SGDFallback(check_every_n_steps=3, log_every_n_steps=every)
    failures = EighFailures(range(2, 4))
    monkeypatch.setattr(torch.linalg, "eigh", failures.eigh)
    trainer = cpu_trainer(
        tmp_path,
        max_steps=12,
        log_every_n_steps=4,
        logger=CSVLogger(tmp_path),
        callbacks=[failures, fallback],
    )
    trainer.fit(ShampooDigits(), datamodule=digits())
    assert written == [s - 1 for s in expected]  # Lightning's 0-based step of those global steps
    assert fallback.counters["switches"] == 4  # the check at step 3 still switched every weight block
    rows = [
        r
        for r in read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv")
        if "shampoo/fallback_switches" in r
    ]
    assert [int(r["step"]) + 1 for r in rows] == expected
    assert [r["shampoo/fallback_switches"] for r in rows] == [4.0] * len(expected)
    assert [r["shampoo/blocks_in_fallback"] for r in rows] == [4.0] * len(expected)
