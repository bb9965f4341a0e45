"""Shared by the Lightning-layer tests: a clean launcher environment, a small Shampoo module on
the digits data and a quiet CPU trainer."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from conftest import DIST_ENV

from lightning_shampoo import AdamPreconditionerConfig, Shampoo
from lightning_shampoo.demo import DigitsClassifier, DigitsDataModule


def make_shampoo(
    module: torch.nn.Module, *, precondition_frequency: int = 1, grafting: bool = True
) -> Shampoo:
    """Shampoo on the weights (grafted onto Adam, or not), Adam on the biases."""
    named = list(module.named_parameters())
    weights = [(n, p) for n, p in named if p.ndim > 1]
    biases = [(n, p) for n, p in named if p.ndim <= 1]
    return Shampoo(
        [
            {"params": [p for _, p in weights], "param_names": [n for n, _ in weights]},
            {
                "params": [p for _, p in biases],
                "param_names": [n for n, _ in biases],
                "preconditioner_config": AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
                "grafting_config": None,
            },
        ],
        lr=3e-3,
        betas=(0.9, 0.999),
        epsilon=1e-10,
        precondition_frequency=precondition_frequency,
        grafting_config=AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8) if grafting else None,
    )


class ShampooDigits(DigitsClassifier):
    """The demo CNN (small) whose optimizer is Shampoo."""

    def __init__(self, precondition_frequency: int = 1, grafting: bool = True) -> None:
        super().__init__(channels=4, hidden=16)
        self.precondition_frequency, self.grafting = precondition_frequency, grafting

    def configure_optimizers(self) -> Any:
        return make_shampoo(self, precondition_frequency=self.precondition_frequency, grafting=self.grafting)


def digits(batch_size: int = 32, shuffle: bool = False) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, shuffle=shuffle)


def cpu_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def read_csv_metrics(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def run_two_ranks(script: str, out: Path, timeout: float = 300) -> None:
    """Run ``script`` (Python source, given ``out`` as its argument) on 2 CPU ranks with
    ``torch.distributed.run`` in a clean environment; fail with its output if it fails."""
    path = out / "two_ranks.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, str(path), str(out)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def figures(row: dict[str, float]) -> dict[str, float]:
    """A logged row or history entry without its ``"step"``."""
    return {k: v for k, v in row.items() if k != "step"}


def finite_params(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def same(a: float, b: float) -> bool:
    """Equal, with ``nan == nan``."""
    return (math.isnan(a) and math.isnan(b)) or a == b
