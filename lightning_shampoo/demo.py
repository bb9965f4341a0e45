"""The demo's model and data, and the demo itself: Shampoo (the drop-in) vs AdamW on scikit-learn's
handwritten digits (1797 8×8 images that ship inside scikit-learn; no download).

``DigitsClassifier`` is a plain LightningModule whose ``configure_optimizers`` returns AdamW;
``ShampooCallback`` turns that into Shampoo grafted onto exactly that AdamW, which is the point:
the module does not change. Both are importable for the LightningCLI (``examples/*.yaml``).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["DemoResult", "DigitsClassifier", "DigitsDataModule", "run_demo"]


class _EpochShuffle(Sampler[int]):
    """A permutation per epoch from ``seed + epoch``: the same order in every run with the same
    seed, and after a resume at an epoch boundary (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits: 8×8 grey images of 0–9, scaled to [0, 1], split train/validation
    with a fixed seed."""

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, shuffle: bool = True
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.batch_size, self.val_fraction, self.seed, self.shuffle = batch_size, val_fraction, seed, shuffle
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(len(y) * self.val_fraction)
        val, train = order[:n_val], order[n_val:]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        n = len(self.train_set)
        sampler = _EpochShuffle(n, self.seed) if self.shuffle else None
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(pl.LightningModule):
    """A small CNN (two 3×3 convs, max-pool, two linear layers) with an AdamW optimizer."""

    def __init__(
        self, channels: int = 16, hidden: int = 64, lr: float = 3e-3, weight_decay: float = 1e-2
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr: float = lr
        self.weight_decay: float = weight_decay
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 16, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        self.val_accuracy = MulticlassAccuracy(num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.val_accuracy(logits, y)
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


# ------------------------------------------------------------------------------------ the demo


@dataclass
class RunResult:
    name: str
    seconds: float
    steps: int
    metrics: list[dict[str, float]] = field(repr=False)  # rows of the run's metrics.csv

    def series(self, key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in self.metrics if key in r and "step" in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def last(self, key: str) -> float:
        values = self.series(key)[1]
        return values[-1] if values else math.nan


@dataclass
class DemoResult:
    runs: dict[str, RunResult]
    plot: Path
    output_dir: Path


class _EpochLines(pl.Callback):
    """Progress for logs (no terminal): one line per epoch instead of a redrawn bar."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        train, loss, acc = (m.get(k, math.nan) for k in ("train/loss_epoch", "val/loss", "val/acc"))
        epoch = f"{trainer.current_epoch + 1}/{trainer.max_epochs}"
        print(
            f"{self.name} epoch {epoch} step {trainer.global_step}: train loss {train:.4f}, "
            f"val loss {loss:.4f}, val acc {acc:.2%}",
            flush=True,
        )


def _read_metrics(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _train(
    name: str,
    callbacks: list[pl.Callback],
    output_dir: Path,
    *,
    max_epochs: int,
    batch_size: int,
    seed: int,
    limit_train_batches: int | float | None,
    progress: bool,
) -> RunResult:
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from rich.console import Console

    pl.seed_everything(seed, verbose=False)
    model, data = DigitsClassifier(), DigitsDataModule(batch_size=batch_size, seed=seed)
    csv_logger = CSVLogger(output_dir, name="csv", version=name)
    bar = progress and Console().is_terminal
    shown: list[pl.Callback] = [RichProgressBar(leave=True)] if bar else []
    if progress and not bar:
        shown.append(_EpochLines(name))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        logger=[TensorBoardLogger(output_dir, name="tensorboard", version=name), csv_logger],
        callbacks=[*callbacks, *shown],
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        deterministic=True,
    )
    began = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - began
    metrics = _read_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    return RunResult(name, seconds, trainer.global_step, metrics)


def _plot(runs: dict[str, RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val, ax_cond) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs.values():
        steps, loss = run.series("train/loss_step")
        ax_loss.plot(steps, loss, label=run.name, alpha=0.85)
        steps, val = run.series("val/loss")
        ax_val.plot(steps, val, marker="o", label=run.name)
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax_val.set(title="validation loss (per epoch)", xlabel="step", ylabel="cross-entropy")
    for key, label in (
        ("shampoo/condition_number_max", "max"),
        ("shampoo/condition_number_median", "median"),
    ):
        for run in runs.values():
            steps, cond = run.series(key)
            if steps:
                ax_cond.plot(steps, cond, marker=".", label=f"{run.name}: {label}")
    ax_cond.set(title="factor condition number (damped)", xlabel="step", yscale="log")
    for ax in (ax_loss, ax_val, ax_cond):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _comparison_table(runs: dict[str, RunResult]) -> Any:
    from rich.table import Table

    table = Table(title="Shampoo (ShampooCallback) vs AdamW on digits: same module, seed and data")
    for column in ("optimizer", "steps", "train loss (last epoch)", "val loss", "val accuracy", "wall time"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for run in runs.values():
        table.add_row(
            run.name,
            str(run.steps),
            f"{run.last('train/loss_epoch'):.4f}",
            f"{run.last('val/loss'):.4f}",
            f"{run.last('val/acc'):.2%}",
            f"{run.seconds:.1f} s",
        )
    return table


def _shampoo_callback() -> pl.Callback:
    """The drop-in with its defaults, logging health every 10 steps (the trainer's cadence)."""
    from .callbacks.health import PreconditionerHealthMonitor
    from .callbacks.shampoo import ShampooCallback

    return ShampooCallback(health_monitor=PreconditionerHealthMonitor(log_every_n_steps=10))


def run_demo(
    output_dir: str | Path = "runs/demo",
    *,
    max_epochs: int = 12,
    batch_size: int = 64,
    seed: int = 0,
    limit_train_batches: int | float | None = None,
    progress: bool = True,
    shampoo_callbacks: Sequence[pl.Callback] | None = None,
) -> DemoResult:
    """Train the same module with AdamW and with ``ShampooCallback()``; print the comparison and
    the health table, write TensorBoard/CSV logs and ``demo.png`` into ``output_dir``."""
    from .callbacks.health import default_console

    console = default_console()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = dict(
        max_epochs=max_epochs,
        batch_size=batch_size,
        seed=seed,
        limit_train_batches=limit_train_batches,
        progress=progress,
    )
    runs: dict[str, RunResult] = {}
    for name, callbacks in (
        ("adamw", []),
        ("shampoo", list(shampoo_callbacks) if shampoo_callbacks is not None else [_shampoo_callback()]),
    ):
        console.rule(f"[bold]{name}")
        runs[name] = _train(name, callbacks, out, **settings)
    plot = out / "demo.png"
    _plot(runs, plot)
    console.print(_comparison_table(runs))
    tensorboard = out / "tensorboard"
    console.print(f"logs: {tensorboard} (tensorboard --logdir {tensorboard}), {out / 'csv'}; plot: {plot}")
    return DemoResult(runs, plot, out)
