"""The demo's model and data, and the demo itself: Shampoo (the drop-in) vs AdamW on scikit-learn's
handwritten digits (1797 8×8 images that ship inside scikit-learn; no download).

``DigitsClassifier`` is a plain LightningModule whose ``configure_optimizers`` returns AdamW;
``ShampooCallback`` turns that into Shampoo grafted onto exactly that AdamW, which is the point:
the module does not change. Both are importable for the LightningCLI (``examples/*.yaml``).

The demo times both runs in one process (``WallClock``: everything from the start of ``fit``) and
reports each one's time to AdamW's final validation loss. Shampoo runs at ``ShampooCallback()``'s
defaults (``--max-preconditioner-dim`` changes its block size, 256 by default: at 1024 the CNN's
64×512 layer is one block whose 512-wide factor the memory rule drops, which cost 0.73× AdamW's
steps instead of 0.45×; docs/benchmarks.md, "make demo").
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


class WallClock(pl.Callback):
    """Wall-clock inside a run, from just before ``trainer.fit`` (``start``): the seconds at the
    end of every optimizer step and of every validation (with its loss). Everything the run
    does counts — Lightning's setup, the first step's plan build, refreshes, validation, logging,
    the health monitor — since that is what a user waits for."""

    def __init__(self) -> None:
        self.began = math.nan
        #: ``{global_step: seconds}`` at the end of each training batch that stepped.
        self.step_seconds: dict[int, float] = {}
        #: ``(global_step, seconds, val loss)`` at the end of each validation run.
        self.validations: list[tuple[int, float, float]] = []

    def start(self) -> None:
        self.began = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step_seconds[trainer.global_step] = time.perf_counter() - self.began

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        seconds = time.perf_counter() - self.began
        self.validations.append((trainer.global_step, seconds, math.nan if loss is None else float(loss)))


@dataclass
class RunResult:
    name: str
    seconds: float
    steps: int
    metrics: list[dict[str, float]] = field(repr=False)  # rows of the run's metrics.csv
    #: ``(global_step, seconds since fit began, val loss)`` after each validation (``WallClock``).
    validations: list[tuple[int, float, float]] = field(default_factory=list, repr=False)
    #: ``{global_step: seconds since fit began}`` after each optimizer step.
    step_seconds: dict[int, float] = field(default_factory=dict, repr=False)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in self.metrics if key in r and "step" in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def timed_series(self, key: str) -> tuple[list[float], list[float]]:
        """``key`` against the seconds since fit began at the end of the step that logged it
        (a row at Lightning's step ``s`` was logged by the batch after which ``s + 1`` steps
        were done)."""
        rows = [r for r in self.metrics if key in r and int(r.get("step", -2)) + 1 in self.step_seconds]
        return [self.step_seconds[int(r["step"]) + 1] for r in rows], [r[key] for r in rows]

    def last(self, key: str) -> float:
        values = self.series(key)[1]
        return values[-1] if values else math.nan

    def reached(self, target: float) -> tuple[int, float] | None:
        """``(step, seconds)`` at the end of the first validation whose loss is ``<= target``."""
        return next(((step, t) for step, t, loss in self.validations if loss <= target), None)


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
    clock = WallClock()
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
        callbacks=[*callbacks, *shown, clock],
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        deterministic=True,
    )
    clock.start()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - clock.began
    metrics = _read_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    return RunResult(name, seconds, trainer.global_step, metrics, clock.validations, clock.step_seconds)


def target_loss(runs: dict[str, RunResult]) -> float:
    """The bar both runs are timed to: AdamW's final validation loss."""
    adamw = runs.get("adamw")
    return adamw.validations[-1][2] if adamw is not None and adamw.validations else math.nan


def demo_figure(runs: dict[str, RunResult]) -> Any:
    """The demo's plot (a matplotlib ``Figure``): first the losses against wall-clock with AdamW's
    final validation loss marked and where each run first reached it, then training and
    validation loss per step, then the factors' condition numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    (ax_time, ax_loss), (ax_val, ax_cond) = axes
    target = target_loss(runs)
    for n, run in enumerate(runs.values()):
        color = f"C{n}"
        seconds, loss = run.timed_series("train/loss_step")
        ax_time.plot(seconds, loss, color=color, alpha=0.35, lw=1, label=f"{run.name}: training")
        seconds = [t for _, t, _ in run.validations]
        val = [v for _, _, v in run.validations]
        ax_time.plot(seconds, val, color=color, marker="o", label=f"{run.name}: validation")
        if (hit := run.reached(target)) is not None:
            reached = f"{run.name} reached it: {hit[1]:.1f} s"
            ax_time.axvline(hit[1], color=color, ls=":", lw=1.5, label=reached)
        steps, loss = run.series("train/loss_step")
        ax_loss.plot(steps, loss, color=color, label=run.name, alpha=0.85)
        steps, val = run.series("val/loss")
        ax_val.plot(steps, val, color=color, marker="o", label=run.name)
    if math.isfinite(target):
        ax_time.axhline(target, color="grey", ls="--", lw=1, label=f"AdamW's final val loss {target:.4f}")
    ax_time.set(
        title="loss against wall-clock (time to AdamW's final val loss: dotted)",
        xlabel="seconds since fit began",
        ylabel="cross-entropy",
        yscale="log",
    )
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax_val.set(title="validation loss (per epoch)", xlabel="step", ylabel="cross-entropy")
    for key, label, style in (
        ("shampoo/condition_number_max", "max", "-"),
        ("shampoo/condition_number_median", "median", "--"),
    ):
        for n, run in enumerate(runs.values()):
            steps, cond = run.series(key)
            if steps:
                ax_cond.plot(steps, cond, color=f"C{n}", ls=style, marker=".", label=f"{run.name}: {label}")
    ax_cond.set(title="factor condition number (damped)", xlabel="step", yscale="log")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _plot(runs: dict[str, RunResult], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = demo_figure(runs)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _reach(run: RunResult, target: float) -> str:
    hit = run.reached(target)
    return "not reached" if hit is None else f"{hit[1]:.1f} s (step {hit[0]})"


def comparison_table(runs: dict[str, RunResult], title: str = "Shampoo (ShampooCallback)") -> Any:
    """The demo's ``rich`` table; ``to AdamW's val loss``: wall-clock from the start of ``fit``
    to the end of the first validation at or below AdamW's final validation loss."""
    from rich.table import Table

    target = target_loss(runs)
    table = Table(title=f"{title} vs AdamW on digits: same module, seed and data")
    columns = (
        "optimizer",
        "steps",
        "train loss (last epoch)",
        "val loss",
        "val accuracy",
        "wall time",
        f"to AdamW's val loss {target:.4f}",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for run in runs.values():
        table.add_row(
            run.name,
            str(run.steps),
            f"{run.last('train/loss_epoch'):.4f}",
            f"{run.last('val/loss'):.4f}",
            f"{run.last('val/acc'):.2%}",
            f"{run.seconds:.1f} s",
            _reach(run, target),
        )
    adamw, shampoo = runs.get("adamw"), runs.get("shampoo")
    if adamw and shampoo and (a := adamw.reached(target)) and (b := shampoo.reached(target)):
        table.caption = (
            f"Shampoo reached AdamW's final validation loss in {b[1] / a[1]:.2f}x AdamW's time "
            f"and {b[0] / a[0]:.2f}x its steps ({shampoo.seconds / shampoo.steps * 1e3:.0f} vs "
            f"{adamw.seconds / adamw.steps * 1e3:.0f} ms per step, everything included)"
        )
    return table


def _shampoo_callback(max_preconditioner_dim: int | float | None = None) -> pl.Callback:
    """The drop-in at its defaults (``max_preconditioner_dim``: ``None`` keeps its own), logging
    health every 10 steps (the trainer's cadence)."""
    from .callbacks.health import PreconditionerHealthMonitor
    from .callbacks.shampoo import ShampooCallback

    return ShampooCallback(
        max_preconditioner_dim=max_preconditioner_dim,
        health_monitor=PreconditionerHealthMonitor(log_every_n_steps=10),
    )


def _warm_up(seed: int) -> None:
    """Both runs are timed from the start of their ``fit``; what only the first ``fit`` of a
    process pays (importing scikit-learn and loading the data, the loggers' first writes, the
    first forward/backward; ~0.25 s, 10% of AdamW's run) is paid here, untimed, so that AdamW,
    which runs first, does not pay it alone."""
    import tempfile

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=2,
            limit_val_batches=1,
            logger=[TensorBoardLogger(tmp, name="tensorboard"), CSVLogger(tmp, name="csv")],
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            deterministic=True,
        )
        trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule(seed=seed))


def run_demo(
    output_dir: str | Path = "runs/demo",
    *,
    max_epochs: int = 12,
    batch_size: int = 64,
    seed: int = 0,
    limit_train_batches: int | float | None = None,
    progress: bool = True,
    shampoo_callbacks: Sequence[pl.Callback] | None = None,
    max_preconditioner_dim: int | float | None = None,
) -> DemoResult:
    """Train the same module with AdamW and with ``ShampooCallback(max_preconditioner_dim=...)``
    (or ``shampoo_callbacks``); print the comparison and the health table, write TensorBoard/CSV
    logs and ``demo.png`` into ``output_dir``."""
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
    _warm_up(seed)
    runs: dict[str, RunResult] = {}
    for name, callbacks in (
        ("adamw", []),
        (
            "shampoo",
            list(shampoo_callbacks)
            if shampoo_callbacks is not None
            else [_shampoo_callback(max_preconditioner_dim)],
        ),
    ):
        console.rule(f"[bold]{name}")
        runs[name] = _train(name, callbacks, out, **settings)
    plot = out / "demo.png"
    _plot(runs, plot)
    title = "Shampoo (ShampooCallback)"
    if shampoo_callbacks is None:
        setting = (
            "" if max_preconditioner_dim is None else f"max_preconditioner_dim={max_preconditioner_dim:g}"
        )
        title = f"Shampoo (ShampooCallback({setting}))"
    console.print(comparison_table(runs, title))
    tensorboard = out / "tensorboard"
    console.print(f"logs: {tensorboard} (tensorboard --logdir {tensorboard}), {out / 'csv'}; plot: {plot}")
    return DemoResult(runs, plot, out)
