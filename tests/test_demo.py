"""The demo's wall-clock comparison: each run's time to AdamW's final validation loss, in the
table and in the plot's first panel (losses against wall-clock), from a real in-process demo run
and from hand-made runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from lightning_helpers import read_csv_metrics
from rich.console import Console

from lightning_shampoo.demo import RunResult, comparison_table, demo_figure, run_demo, target_loss


def _val_losses(path: Path) -> list[float]:
    return [r["val/loss"] for r in read_csv_metrics(path / "metrics.csv") if "val/loss" in r]


def _text(table: object) -> str:
    console = Console(record=True, width=250)
    console.print(table)
    return console.export_text()


def _line(ax: object, label: str) -> object:
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]  # type: ignore[attr-defined]
    return line


def test_demo_times_each_run_to_adamws_final_validation_loss(tmp_path: Path) -> None:
    result = run_demo(tmp_path, max_epochs=3, limit_train_batches=8, progress=False)
    runs = result.runs
    adamw_val = [
        r["val/loss"] for r in read_csv_metrics(tmp_path / "csv" / "adamw" / "metrics.csv") if "val/loss" in r
    ]
    target = target_loss(runs)
    assert len(adamw_val) == 3 and target == pytest.approx(adamw_val[-1], rel=1e-6)
    for name, run in runs.items():
        csv_val = [
            r["val/loss"]
            for r in read_csv_metrics(tmp_path / "csv" / name / "metrics.csv")
            if "val/loss" in r
        ]
        steps, seconds, losses = zip(*run.validations)
        assert steps == (8, 16, 24)  # one validation per epoch, after its 8 steps
        assert list(losses) == pytest.approx(csv_val, rel=1e-6)  # the losses the CSV logger got
        assert 0 < seconds[0] < seconds[1] < seconds[2] <= run.seconds
        assert sorted(run.step_seconds) == list(range(1, 25))
        times = [run.step_seconds[s] for s in range(1, 25)]
        assert times == sorted(times) and times[7] < seconds[0] < times[8]  # validation after step 8
        first = next(i for i, v in enumerate(losses) if v <= target) if min(losses) <= target else None
        assert run.reached(target) == (None if first is None else (steps[first], seconds[first]))
    assert runs["adamw"].reached(target) is not None  # its own final loss, at the latest at the end

    text = _text(comparison_table(runs))
    assert f"to AdamW's val loss {target:.4f}" in text
    for run in runs.values():
        row = next(line for line in text.splitlines() if line.startswith(f"│ {run.name} "))
        hit = run.reached(target)
        assert (f"{hit[1]:.1f} s (step {hit[0]})" if hit else "not reached") in row
        assert f"{run.seconds:.1f} s" in row

    fig = demo_figure(runs)
    ax = fig.axes[0]  # the first panel: where users look first
    assert "wall-clock" in ax.get_title() and ax.get_xlabel() == "seconds since fit began"
    for run in runs.values():
        line = _line(ax, f"{run.name}: validation")
        assert list(line.get_xdata()) == [t for _, t, _ in run.validations]
        assert list(line.get_ydata()) == [v for _, _, v in run.validations]
        train = _line(ax, f"{run.name}: training")
        logged = [r for r in run.metrics if "train/loss_step" in r]
        assert len(train.get_xdata()) == len(logged) > 0
        assert list(train.get_xdata()) == [run.step_seconds[int(r["step"]) + 1] for r in logged]
    (bar,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("AdamW's final val loss")]
    assert list(bar.get_ydata()) == [target, target]
    reached = sorted(t for run in runs.values() if (hit := run.reached(target)) for t in [hit[1]])
    verticals = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":")
    assert verticals == reached
    for run in runs.values():
        if hit := run.reached(target):
            assert _line(ax, f"{run.name} reached it: {hit[1]:.1f} s").get_xdata()[0] == hit[1]
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(name: str, seconds: float, validations: list[tuple[int, float, float]]) -> RunResult:
    return RunResult(name, seconds, validations[-1][0], [], validations, {})


def test_table_says_how_much_sooner_shampoo_reached_adamws_loss() -> None:
    runs = {
        "adamw": _run("adamw", 4.0, [(10, 1.0, 0.5), (20, 2.0, 0.3), (30, 3.0, 0.2), (40, 4.0, 0.25)]),
        "shampoo": _run("shampoo", 8.0, [(10, 2.0, 0.4), (20, 4.0, 0.1), (30, 6.0, 0.05), (40, 8.0, 0.04)]),
    }
    assert target_loss(runs) == 0.25
    assert runs["adamw"].reached(0.25) == (30, 3.0)  # its first validation at or below its final loss
    assert runs["shampoo"].reached(0.25) == (20, 4.0)
    text = _text(comparison_table(runs))
    assert "3.0 s (step 30)" in text and "4.0 s (step 20)" in text
    assert "1.33x AdamW's time and 0.67x its steps (200 vs 100 ms per step" in text

    runs["shampoo"] = _run("shampoo", 8.0, [(10, 2.0, 0.4), (20, 4.0, 0.3)])
    text = _text(comparison_table(runs))
    assert "not reached" in text and "AdamW's time" not in text
    assert math.isnan(target_loss({"shampoo": runs["shampoo"]}))
