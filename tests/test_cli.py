"""The ``lightning-shampoo`` console script: the LightningCLI example YAML and the demo, each run
as a user would (a subprocess), plus the usage text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning_helpers import (
    DIST_ENV,
    read_csv_metrics,
)

from lightning_shampoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "lightning-shampoo"


def run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", COLUMNS="160")
    assert SCRIPT.exists(), f"{SCRIPT} missing: install the package (pip install -e .)"
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "lightning-shampoo demo" in out and "{fit,validate,test,predict}" in out
    assert main(["bogus"]) == 2
    assert "usage" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0 and "--output-dir" in capsys.readouterr().out


def test_lightning_cli_example_yaml_runs(tmp_path: Path) -> None:
    config = ROOT / "examples" / "digits.yaml"
    args = ["fit", "--config", str(config), "--trainer.max_steps=10", "--trainer.enable_progress_bar=false"]
    done = run(args, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "using the trainer's own PreconditionerHealthMonitor" in done.stdout + done.stderr
    rows = read_csv_metrics(next((tmp_path / "runs" / "digits" / "csv").glob("version_*/metrics.csv")))
    logged = [r for r in rows if "shampoo/condition_number_max" in r]
    assert [r["step"] for r in logged] == [9]  # the YAML's monitor follows trainer.log_every_n_steps (10)
    assert logged[0]["shampoo/blocks"] == 9  # 8 at 1024-wide blocks; the 64×512 layer is two 256-wide ones
    counters = [r for r in rows if "shampoo/fallback_switches" in r]  # the fallback's row, same step
    assert [r["step"] for r in counters] == [9] and counters[0]["shampoo/fallback_switches"] == 0
    assert list((tmp_path / "runs" / "digits" / "tensorboard").glob("version_*/events.out.tfevents.*"))
    assert "Shampoo preconditioner health at step 10" in done.stdout


def test_demo_quick_variant(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["demo", "--output-dir", str(out), "--max-epochs", "2", "--limit-train-batches", "10"]
    done = run(args, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    assert "Shampoo preconditioner health at step 20" in text
    assert "Shampoo (ShampooCallback()) vs AdamW" in text
    assert "to AdamW's val loss" in text  # the time-to-loss column (tests/test_demo.py: its values)
    adamw_row = next(line for line in text.splitlines() if line.startswith("│ adamw "))
    assert "s (step 20)" in adamw_row or "s (step 10)" in adamw_row  # AdamW reaches its final loss
    assert "adamw epoch 2/2 step 20" in text and "shampoo epoch 2/2 step 20" in text  # progress lines
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run_name in ("adamw", "shampoo"):
        rows = read_csv_metrics(out / "csv" / run_name / "metrics.csv")
        assert any("val/acc" in r for r in rows) and any("train/loss_step" in r for r in rows)
        assert list((out / "tensorboard" / run_name).glob("events.out.tfevents.*"))
    shampoo = read_csv_metrics(out / "csv" / "shampoo" / "metrics.csv")
    assert [r["step"] for r in shampoo if "shampoo/condition_number_max" in r] == [9, 19]
    assert not any("shampoo/blocks" in r for r in read_csv_metrics(out / "csv" / "adamw" / "metrics.csv"))
