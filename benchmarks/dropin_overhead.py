"""The drop-in's own overhead: what the health monitor (and its histograms) and the fallback's
health checks cost on top of ``ShampooCallback()``'s optimizer.

Trains the demo's ``DigitsClassifier`` on scikit-learn's digits (CPU, one process, TensorBoard and
CSV loggers as in ``make demo``) with ``ShampooCallback()`` at its defaults and with parts of it
switched off, the variants interleaved over ``--repeats`` rounds, and prints for each variant the
median fit time (wall-clock, and the process's CPU time, which a busy shared machine disturbs
less) and its ratio to the bare drop-in (no monitor, no fallback). Whole-run ratios on a shared
machine are still noisy, so each variant also times its own health hooks (the monitor's and
the fallback's ``on_train_batch_end`` and ``on_train_end``) and prints their share of the fit: the
direct measure of the overhead. The frequency scheduler's hooks (part of every variant: it sets the
refresh schedule, and writes the refresh counters on refresh steps) are timed apart.

    OMP_NUM_THREADS=1 python benchmarks/dropin_overhead.py                  # trainer default cadence (50)
    OMP_NUM_THREADS=1 python benchmarks/dropin_overhead.py --log-every-n-steps 10   # the demo's
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_shampoo.callbacks import (
    PreconditionerHealthMonitor,
    PreconditionFrequencyScheduler,
    SGDFallback,
    ShampooCallback,
)
from lightning_shampoo.demo import DigitsClassifier, DigitsDataModule

#: Each variant from the logging cadence (``"histograms every log"``: the monitor's default before
#: histograms moved to every ``HISTOGRAM_EVERY_N_LOGS``-th logging step).
VARIANTS: dict[str, Callable[[int], ShampooCallback]] = {
    "defaults": lambda every: ShampooCallback(),
    "histograms every log (before)": lambda every: ShampooCallback(
        health_monitor=PreconditionerHealthMonitor(histogram_every_n_steps=every)
    ),
    "no histograms": lambda every: ShampooCallback(
        health_monitor=PreconditionerHealthMonitor(histograms=False)
    ),
    "no monitor": lambda every: ShampooCallback(health_monitor=False),
    "bare (no monitor, no fallback)": lambda every: ShampooCallback(health_monitor=False, fallback=False),
}
BARE = "bare (no monitor, no fallback)"


class _HookClock:
    """Adds up the time spent in the named hooks of the given callbacks (instance-level wrappers)."""

    HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_train_end")

    def __init__(self, callbacks: list[pl.Callback]) -> None:
        self.seconds = 0.0
        for callback in callbacks:
            for hook in self.HOOKS:
                setattr(callback, hook, self._timed(getattr(callback, hook)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began

        return timed


def run(variant: str, epochs: int, log_every: int, out: Path) -> tuple[float, float, float, float]:
    """(fit seconds, fit CPU seconds, seconds inside the health hooks, inside the scheduler's) of
    one training run."""
    pl.seed_everything(0, verbose=False)
    callback = VARIANTS[variant](log_every)
    health = [c for c in callback.callbacks if isinstance(c, PreconditionerHealthMonitor | SGDFallback)]
    clock = _HookClock(health)
    scheduler = _HookClock([c for c in callback.callbacks if isinstance(c, PreconditionFrequencyScheduler)])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=[TensorBoardLogger(out, name="tb"), CSVLogger(out, name="csv")],
        callbacks=[callback],
        log_every_n_steps=log_every,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    began, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):  # the health table printed at the end
        trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule(seed=0))
    return time.perf_counter() - began, time.process_time() - cpu, clock.seconds, scheduler.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--epochs", type=int, default=22, help="epochs of 23 steps (22: 506 steps, one default histogram)"
    )
    parser.add_argument("--log-every-n-steps", type=int, default=50, help="Trainer(log_every_n_steps)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    fits: dict[str, list[float]] = {v: [] for v in VARIANTS}
    hooks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    schedulers: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpus: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        run(BARE, 1, args.log_every_n_steps, Path(tmp) / "warm-up")  # imports, first-use costs
        for r in range(args.repeats):
            for v in VARIANTS:
                fit, cpu, hook, sched = run(v, args.epochs, args.log_every_n_steps, Path(tmp) / f"{r}")
                fits[v].append(fit)
                cpus[v].append(cpu)
                hooks[v].append(hook)
                schedulers[v].append(sched / fit)
    bare, bare_cpu = statistics.median(fits[BARE]), statistics.median(cpus[BARE])
    print(
        f"ShampooCallback overhead: digits CNN, {args.epochs} epochs x 23 steps, "
        f"log_every_n_steps={args.log_every_n_steps}, median of {args.repeats}"
    )
    print(
        "| variant | fit (s) | vs bare | fit CPU (s) | vs bare | health hooks (s) | health hooks / fit "
        "| scheduler hooks / fit |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for v in VARIANTS:
        fit, cpu, hook = statistics.median(fits[v]), statistics.median(cpus[v]), statistics.median(hooks[v])
        sched = statistics.median(schedulers[v])
        print(
            f"| {v} | {fit:.2f} | {fit / bare:.3f}x | {cpu:.2f} | {cpu / bare_cpu:.3f}x | {hook:.3f} "
            f"| {hook / fit:.1%} | {sched:.1%} |"
        )


if __name__ == "__main__":
    main()
