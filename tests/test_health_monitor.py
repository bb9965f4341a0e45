"""PreconditionerHealthMonitor in real Trainer.fit runs on CPU: CSV metrics, the rich table,
TensorBoard spectra, per-layer modes, and a 2-process DDP run (gloo, launched by
``torch.distributed.run`` in a subprocess, so Lightning does not launch processes itself)."""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_helpers import (
    ShampooDigits,
    cpu_trainer,
    digits,
    figures,
    read_csv_metrics,
    run_two_ranks,
)
from rich.console import Console

from lightning_shampoo import PreconditionerHealthMonitor, Shampoo
from lightning_shampoo.callbacks.health import HISTOGRAM_EVERY_N_LOGS, health_metrics
from lightning_shampoo.demo import DigitsClassifier
from lightning_shampoo.health import summarize

OVERALL = (
    "blocks",
    "condition_number_max",
    "condition_number_median",
    "min_eigenvalue",
    "max_eigenvalue",
    "failures",
    "nonfinite_grads",
    "blocks_in_fallback",
    "steps_since_refresh_max",
    "refresh_seconds",
)
LAYER = (
    "condition_number_max",
    "condition_number_median",
    "min_eigenvalue",
    "max_eigenvalue",
    "failures",
    "nonfinite_grads",
    "blocks_in_fallback",
    "steps_since_refresh",
)


def test_metrics_reach_the_csv_logger_finite_and_equal_to_the_optimizer_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []
    real_health = Shampoo.health

    def counted(self: Shampoo) -> list:
        calls.append(self.param_groups[0].get("step", 0))
        return real_health(self)

    monkeypatch.setattr(Shampoo, "health", counted)
    monitor = PreconditionerHealthMonitor(log_every_n_steps=4, top_k=2)
    model = ShampooDigits(precondition_frequency=3)
    trainer = cpu_trainer(
        tmp_path, max_steps=12, log_every_n_steps=4, logger=CSVLogger(tmp_path), callbacks=[monitor]
    )
    trainer.fit(model, datamodule=digits())

    # health() ran on logging steps only (4, 8, 12) and once more for the end-of-fit table
    assert calls == [4, 8, 12, 12]
    rows = [
        r for r in read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv") if "shampoo/blocks" in r
    ]
    assert [r["step"] for r in rows] == [3, 7, 11]  # Lightning's 0-based step of global steps 4, 8, 12
    for row in rows:
        for name in OVERALL:
            assert math.isfinite(row[f"shampoo/{name}"]), name
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("shampoo/"))

    optimizer = trainer.optimizers[0]
    health = optimizer.health()
    assert rows[-1]["shampoo/blocks"] == len(optimizer.block_keys()) == len(health)
    # the logged figures are the optimizer's own summary at that step (the last step is a log step)
    expected = summarize(health)
    for key, value in expected.items():
        assert rows[-1][f"shampoo/{key}"] == pytest.approx(value, rel=1e-6), key
    # frequency 3: at step 12 the last refresh was at step 12; at step 8 it was at step 6
    assert [r["shampoo/steps_since_refresh_max"] for r in rows] == [1.0, 2.0, 0.0]
    assert rows[-1]["shampoo/refresh_seconds"] > 0.0

    # per-layer detail: the worst layers by condition number, every field present
    layers = {k.split("/")[1] for r in rows for k in r if k.count("/") == 2}
    worst = sorted(
        {h.param_name for h in health if h.condition_numbers},
        key=lambda n: max(h.max_condition_number for h in health if h.param_name == n),
    )[-2:]
    assert set(worst) <= layers and 2 <= len(layers) <= 4
    for name in worst:
        for field in LAYER:
            assert math.isfinite(rows[-1][f"shampoo/{name}/{field}"])
        layer_max = max(h.max_condition_number for h in health if h.param_name == name)
        assert rows[-1][f"shampoo/{name}/condition_number_max"] == pytest.approx(layer_max, rel=1e-6)
    assert monitor.history[-1]["step"] == 12.0

    # the end-of-fit rich table went to stdout
    out = capsys.readouterr().out
    assert "Shampoo preconditioner health at step 12" in out
    assert worst[-1] in out


def test_rich_table_on_demand_lists_the_worst_blocks_first(tmp_path: Path) -> None:
    monitor = PreconditionerHealthMonitor(log_every_n_steps=5, print_table=False)
    trainer = cpu_trainer(tmp_path, max_steps=5, log_every_n_steps=5, callbacks=[monitor])
    trainer.fit(ShampooDigits(), datamodule=digits())
    console = Console(record=True, width=200)
    tables = monitor.print_table(trainer, console=console, rows=3)
    text = console.export_text()
    assert len(tables) == 1 and tables[0].row_count == 3
    for header in ("layer", "shape", "κ max", "λ min", "λ max", "failures", "stale", "fallback"):
        assert header in text
    health = trainer.optimizers[0].health()
    ranked = sorted(health, key=lambda h: -h.max_condition_number if h.condition_numbers else math.inf)
    body = [line for line in text.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in body] == [h.param_name for h in ranked[:3]]
    assert f"{ranked[0].max_condition_number:.3g}" in body[0]


def test_tensorboard_gets_eigenvalue_spectra_per_layer(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    # Histograms at every logging step (their default is every HISTOGRAM_EVERY_N_LOGS-th one).
    monitor = PreconditionerHealthMonitor(log_every_n_steps=3, histogram_every_n_steps=3, print_table=False)
    trainer = cpu_trainer(tmp_path, max_steps=6, log_every_n_steps=3, logger=logger, callbacks=[monitor])
    trainer.fit(ShampooDigits(), datamodule=digits())
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    tags = set(events.Tags()["histograms"])
    health = trainer.optimizers[0].health()
    factored = [h for h in health if h.condition_numbers]
    assert tags == {
        f"shampoo_spectra/{h.param_name}/factor{i}_log10_eigenvalues"
        for h in factored
        for i in (0, 1)[: len(h.condition_numbers)]
    }
    scalars = [e.step for e in events.Scalars("shampoo/condition_number_max")]
    assert scalars == [2, 5]  # Lightning's 0-based step of global steps 3 and 6
    for h in factored:
        series = events.Histograms(f"shampoo_spectra/{h.param_name}/factor0_log10_eigenvalues")
        assert [e.step for e in series] == scalars  # histograms on the scalars' x-axis
        last = series[-1].histogram_value
        assert last.num == h.shape[0]  # one eigenvalue per row of the first factor
        # the spectrum's top is the largest eigenvalue the last refresh (step 6) recorded
        assert last.max == pytest.approx(math.log10(h.max_eigenvalues[0]), abs=1e-3)


def test_histograms_default_to_every_tenth_logging_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spectrum costs an eigvalsh per factor (about half a refresh): by default only every
    HISTOGRAM_EVERY_N_LOGS-th logging step computes them, on the scalars' x-axis."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert HISTOGRAM_EVERY_N_LOGS == 10
    spectra_steps: list[int] = []
    real_spectra = Shampoo.factor_spectra

    def counted(self: Shampoo) -> dict[tuple[str, int], torch.Tensor]:
        spectra_steps.append(int(self.param_groups[0]["step"]))
        return real_spectra(self)

    monkeypatch.setattr(Shampoo, "factor_spectra", counted)
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = PreconditionerHealthMonitor(log_every_n_steps=2, print_table=False)
    trainer = cpu_trainer(tmp_path, max_steps=41, log_every_n_steps=2, logger=logger, callbacks=[monitor])
    trainer.fit(ShampooDigits(), datamodule=digits())
    assert spectra_steps == [20, 40]  # logging steps 2, 4, ..., 40: the 10th and the 20th
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    scalars = [e.step for e in events.Scalars("shampoo/condition_number_max")]
    assert scalars == list(range(1, 41, 2))
    tags = events.Tags()["histograms"]
    assert tags and all([e.step for e in events.Histograms(t)] == [19, 39] for t in tags)


@pytest.mark.parametrize("top_k", ["all", None, 0])
def test_per_layer_detail_modes(tmp_path: Path, top_k: str | None) -> None:
    monitor = PreconditionerHealthMonitor(log_every_n_steps=2, top_k=top_k, print_table=False)
    trainer = cpu_trainer(tmp_path, max_steps=2, log_every_n_steps=2, callbacks=[monitor])
    trainer.fit(ShampooDigits(), datamodule=digits())
    layers = {k.split("/")[1] for k in monitor.history[-1] if k.count("/") == 2}
    names = {n for n, _ in trainer.lightning_module.named_parameters()}
    assert layers == (names if top_k == "all" else set())
    assert set(trainer.callback_metrics) >= {f"shampoo/{k}" for k in OVERALL}


def _health_rows(trainer: pl.Trainer) -> list[dict[str, float]]:
    """The CSV rows that carry health figures (one per logging step of the monitor)."""
    rows = read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv")
    return [r for r in rows if any(k.startswith("shampoo/") for k in r)]


@pytest.mark.parametrize(("own", "expected"), [(6, [6, 12, 18]), (8, [8, 16]), (3, [3, 6, 9, 12, 15, 18])])
def test_its_own_cadence_reaches_the_loggers_exactly_without_warnings(
    tmp_path: Path, own: int, expected: list[int]
) -> None:
    """Trainer cadence 4: the monitor's figures reach the CSV at exactly its own steps — not the
    trainer's, not both, never a stale copy on a later step — and nothing warns about it."""
    monitor = PreconditionerHealthMonitor(own, print_table=False)
    trainer = cpu_trainer(
        tmp_path, max_steps=18, log_every_n_steps=4, logger=CSVLogger(tmp_path), callbacks=[monitor]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(PreconditionerHealthMonitor|log_every_n_steps).*")
        trainer.fit(ShampooDigits(), datamodule=digits())
    rows = _health_rows(trainer)
    assert [int(r["step"]) + 1 for r in rows] == expected  # CSV steps are 0-based
    assert [h["step"] for h in monitor.history] == [float(s) for s in expected]
    for row, logged in zip(rows, monitor.history, strict=True):
        assert figures(row) == figures(logged)
    # the loss Lightning logs every 4 steps lines up with the health rows on shared steps
    every_row = read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv")
    loss_steps = {int(r["step"]) + 1 for r in every_row if "train/loss_step" in r}
    assert {s for s in expected if s % 4 == 0} <= loss_steps


def test_warns_when_there_is_no_shampoo(tmp_path: Path) -> None:
    monitor = PreconditionerHealthMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="no Shampoo optimizer"):
        cpu_trainer(tmp_path, max_steps=2, log_every_n_steps=1, callbacks=[monitor]).fit(
            DigitsClassifier(channels=2, hidden=4), datamodule=digits()
        )
    assert not monitor.history


def test_follows_the_trainer_cadence_when_none(tmp_path: Path) -> None:
    monitor = PreconditionerHealthMonitor(log_every_n_steps=None, print_table=False)
    cpu_trainer(tmp_path, max_steps=6, log_every_n_steps=3, callbacks=[monitor]).fit(
        ShampooDigits(), datamodule=digits()
    )
    assert [h["step"] for h in monitor.history] == [3.0, 6.0]


def test_gradient_accumulation_logs_once_per_optimizer_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_health = Shampoo.health
    monkeypatch.setattr(Shampoo, "health", lambda self: calls.append(1) or real_health(self))
    monitor = PreconditionerHealthMonitor(log_every_n_steps=2, print_table=False)
    trainer = cpu_trainer(
        tmp_path, max_steps=4, log_every_n_steps=2, accumulate_grad_batches=3, callbacks=[monitor]
    )
    trainer.fit(ShampooDigits(), datamodule=digits())
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == 12
    # health read on the two logging steps and once at the end (the never-preconditioned check)
    assert [h["step"] for h in monitor.history] == [2.0, 4.0] and len(calls) == 3


def test_health_metrics_leave_unknown_figures_out() -> None:
    from lightning_shampoo.callbacks._health_table import HealthSnapshot
    from lightning_shampoo.health import BlockHealth

    record = BlockHealth(0, "w", 0, (3,), 0, "adam", 5, -1, (), (), (), 0, 0, None)
    metrics = health_metrics(HealthSnapshot([record], [0.0]), layers=["w"])
    assert "shampoo/condition_number_max" not in metrics and "shampoo/w/condition_number_max" not in metrics
    assert metrics["shampoo/blocks"] == 1.0 and metrics["shampoo/w/failures"] == 0.0


DDP_SCRIPT = textwrap.dedent(
    '''
    import json, sys
    from dataclasses import asdict
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from lightning_helpers import ShampooDigits, cpu_trainer, digits

    from lightning_shampoo import PreconditionerHealthMonitor, SGDFallback
    from lightning_shampoo.callbacks._health_table import gather_trainer_health

    REAL_EIGH = torch.linalg.eigh


    class EighFailures(pl.Callback):
        """eigh raises during optimizer steps 2 and 3 on every rank."""

        active = False

        def on_train_batch_start(self, trainer, *args):
            EighFailures.active = trainer.global_step + 1 in (2, 3)


    def eigh(*args, **kwargs):
        if EighFailures.active:
            raise torch.linalg.LinAlgError("injected")
        return REAL_EIGH(*args, **kwargs)


    torch.linalg.eigh = eigh


    class Probe(pl.Callback):
        """At the end: gather once as is (rank 0 fills every row) and once as if the blocks were
        sharded (each rank fills only its own), and write both with the monitor's history."""

        def __init__(self, monitor, fallback, out):
            self.monitor, self.fallback, self.out = monitor, fallback, out

        def on_train_end(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            full = gather_trainer_health(trainer, opt)
            keys = opt.block_keys()
            mine = {k for j, k in enumerate(keys) if j % trainer.world_size == trainer.global_rank}
            health = opt.health
            opt.health = lambda: [h for h in health() if h.key in mine]
            opt.sharded = True
            try:
                split = gather_trainer_health(trainer, opt)
            finally:
                del opt.health
                opt.sharded = False
            result = {
                "world_size": trainer.world_size,
                "history": list(self.monitor.history),
                "full": json.dumps([asdict(r) for r in full.records]),
                "split": json.dumps([asdict(r) for r in split.records]),
                "blocks": len(keys),
                "refresh_ranks": len(full.refresh_seconds),
                "fallback": json.dumps(self.fallback.state_dict(), sort_keys=True),
                "in_fallback": [h.fallback for h in full.records],
            }
            Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


    if __name__ == "__main__":
        out = Path(sys.argv[1])
        monitor = PreconditionerHealthMonitor(log_every_n_steps=3, top_k=2, print_table=False)
        fallback = SGDFallback(check_every_n_steps=3, retry_after=10)
        trainer = cpu_trainer(
            out,
            strategy="ddp",
            devices=2,
            max_steps=6,
            log_every_n_steps=3,
            logger=CSVLogger(out),
            callbacks=[EighFailures(), fallback, monitor, Probe(monitor, fallback, out)],
        )
        trainer.fit(ShampooDigits(), datamodule=digits(batch_size=16))
    '''
)


def test_ddp_two_ranks_log_identical_keys_and_values_and_take_identical_fallback_decisions(
    tmp_path: Path,
) -> None:
    run_two_ranks(DDP_SCRIPT, tmp_path, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    history = [r["history"] for r in ranks]
    assert [h["step"] for h in history[0]] == [3.0, 6.0]
    # same keys and the same values on both ranks (nan-free: json would not compare them)
    assert json.dumps(history[0], sort_keys=True) == json.dumps(history[1], sort_keys=True)
    for entry in history[0]:
        assert entry["shampoo/blocks"] == ranks[0]["blocks"]  # each block counted once, not per rank
        assert any(k.count("/") == 2 for k in entry)  # per-layer keys too
    for r in ranks:
        assert r["full"] == r["split"]  # ownership-split filling gives the same table
        assert r["refresh_ranks"] == 2
    assert ranks[0]["full"] == ranks[1]["full"]
    # the fallback took the same decisions on both ranks: the 4 weight blocks, switched at step 3
    assert ranks[0]["fallback"] == ranks[1]["fallback"]
    assert json.loads(ranks[0]["fallback"])["counters"]["switches"] == 4
    assert ranks[0]["in_fallback"].count("grafting") == 4
    assert [h["shampoo/blocks_in_fallback"] for h in history[0]] == [4.0, 4.0]
    rows = read_csv_metrics(next(tmp_path.glob("lightning_logs/version_*/metrics.csv")))
    logged = [r for r in rows if "shampoo/blocks" in r]
    assert [r["shampoo/condition_number_max"] for r in logged] == [
        h["shampoo/condition_number_max"] for h in history[0]
    ]
    assert torch.isfinite(torch.tensor([r["shampoo/condition_number_max"] for r in logged])).all()
    # the fallback's counters: written by rank 0 once per logging step, at the health rows' steps
    counters = [r for r in rows if "shampoo/fallback_switches" in r]
    assert [r["step"] for r in counters] == [r["step"] for r in logged] == [2.0, 5.0]
    assert [r["shampoo/fallback_switches"] for r in counters] == [4.0, 4.0]
    assert [r["shampoo/blocks_in_fallback"] for r in counters] == [4.0, 4.0]
