"""``PreconditionerHealthMonitor``: preconditioner health in every Lightning logger.

Health is read only on logging steps (``optimizer.health()`` synchronises with the device), and
it reaches every rank through one summed collective (see ``_health_table``), so every rank logs
the same keys with the same values — a key logged on one rank only would hang a DDP job.

Why not torchmetrics: a health snapshot is not a metric accumulated over batches, and
torchmetrics synchronises each state with its own collective (``cat`` states for a median are an
all-gather of ragged lists), while counting each block exactly once needs ownership-aware
filling of a single table; one summed ``all_reduce`` of that table does it in one call.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table

from .._checks import describe, require_bool, require_int, require_str
from ..health import BlockHealth, summarize
from ..optim import Shampoo
from ._health_table import HealthSnapshot, gather_trainer_health, shampoo_optimizers

__all__ = ["PreconditionerHealthMonitor", "health_metrics", "render_health_table"]

_LAYER_FIELDS = (
    "condition_number_max",
    "condition_number_median",
    "min_eigenvalue",
    "max_eigenvalue",
    "failures",
    "nonfinite_grads",
    "blocks_in_fallback",
)


def _nan_max(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def _staleness(records: Sequence[BlockHealth]) -> float:
    """Largest number of steps since a factored block's last successful refresh."""
    return _nan_max([float(s) for r in records if (s := r.steps_since_refresh) is not None])


def _badness(records: Sequence[BlockHealth]) -> tuple[bool, float]:
    """Sort key, worst first: trouble (fallback, failures, non-finite grads), then condition number."""
    trouble = any(r.fallback is not None or r.failure_count or r.nonfinite_count for r in records)
    cond = _nan_max([r.max_condition_number for r in records])
    return trouble, -math.inf if math.isnan(cond) else cond


def _by_layer(records: Sequence[BlockHealth]) -> dict[str, list[BlockHealth]]:
    layers: dict[str, list[BlockHealth]] = {}
    for r in records:
        layers.setdefault(r.param_name, []).append(r)
    return layers


def worst_layers(records: Sequence[BlockHealth], k: int) -> list[str]:
    """Names of the ``k`` worst layers that have anything to report (factors or trouble)."""
    layers = _by_layer(records)
    candidates = [name for name, rs in layers.items() if _badness(rs) != (False, -math.inf)]
    return sorted(candidates, key=lambda name: _badness(layers[name]), reverse=True)[:k]


def health_metrics(
    snapshot: HealthSnapshot, prefix: str = "shampoo", layers: Sequence[str] = ()
) -> dict[str, float]:
    """Overall figures (``summarize`` of every block, staleness, slowest rank's refresh time) and
    per-layer figures for ``layers``. Unknown (``nan``) figures are left out."""
    records = snapshot.records
    metrics = {f"{prefix}/{k}": v for k, v in summarize(records).items()}
    metrics[f"{prefix}/steps_since_refresh_max"] = _staleness(records)
    metrics[f"{prefix}/refresh_seconds"] = max(snapshot.refresh_seconds, default=math.nan)
    by_layer = _by_layer(records)
    for name in layers:
        rs = by_layer.get(name)
        if not rs:
            continue
        summary = summarize(rs)
        for field in _LAYER_FIELDS:
            metrics[f"{prefix}/{name}/{field}"] = summary[field]
        metrics[f"{prefix}/{name}/steps_since_refresh"] = _staleness(rs)
    return {k: float(v) for k, v in metrics.items() if not math.isnan(v)}


def default_console() -> Console:
    """The terminal's console, or a 150-column one for logs (rich assumes 80 without a terminal)."""
    console = Console()
    return console if console.is_terminal else Console(width=150)


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3g}"


def render_health_table(records: Sequence[BlockHealth], rows: int = 10, title: str | None = None) -> Table:
    """A ``rich`` table of the ``rows`` worst blocks (trouble first, then condition number).
    ``stale``: steps since the block's last successful refresh; ``ε×``: its damping multiplier."""
    worst = sorted(records, key=lambda r: _badness([r]), reverse=True)[:rows]
    step = max((r.step for r in records), default=0)
    summary = summarize(records)
    cond_max, cond_median = summary["condition_number_max"], summary["condition_number_median"]
    table = Table(
        title=title or f"Shampoo preconditioner health at step {step}: worst {len(worst)} of {len(records)}",
        caption=(
            f"κ max {_fmt(cond_max)}, median {_fmt(cond_median)}"
            f" · failures {int(summary['failures'])} · non-finite grads {int(summary['nonfinite_grads'])}"
            f" · blocks in fallback {int(summary['blocks_in_fallback'])}"
        ),
    )
    for column in ("layer", "block", "shape", "preconditioner"):
        table.add_column(column, overflow="fold")
    for column in ("κ max", "λ min", "λ max", "failures", "non-finite", "stale", "ε×"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("fallback", no_wrap=True)
    for r in worst:
        since = r.steps_since_refresh
        stale = "—" if not r.condition_numbers else ("never" if since is None else str(since))
        table.add_row(
            r.param_name,
            str(r.block_index),
            "×".join(map(str, r.shape)),
            r.preconditioner,
            _fmt(r.max_condition_number),
            _fmt(min(r.min_eigenvalues, default=math.nan)),
            _fmt(max(r.max_eigenvalues, default=math.nan)),
            str(r.failure_count),
            str(r.nonfinite_count),
            stale,
            f"{r.epsilon_scale:g}",
            r.fallback or "",
        )
    return table


class PreconditionerHealthMonitor(pl.Callback):
    """Logs Shampoo's per-block health under ``shampoo/…`` through ``pl_module.log``.

    Args:
        log_every_n_steps: log every this many optimizer steps (``None``: the trainer's
            ``log_every_n_steps``). Best equal to the trainer's: Lightning writes callback metrics
            to the loggers only on its own logging steps, and repeats them on later ones.
        top_k: per-layer detail: the ``k`` worst layers (a layer once reported stays reported, so
            its curve has neither gaps nor stale points), ``"all"`` layers, or ``None``/``0``.
        histograms: with a TensorBoard logger, log each layer's factor eigenvalue spectra
            (``log10``) every ``histogram_every_n_steps`` (default: every logging step); rank 0
            writes them, from the blocks it holds (all of them unless the optimizer is sharded).
        print_table: print a ``rich`` table of the ``table_rows`` worst blocks when training
            ends (rank 0); ``print_table()`` does it on demand.
        prefix: metric namespace; a second Shampoo optimizer logs under ``{prefix}/opt1/…``.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = 50,
        top_k: int | Literal["all"] | None = 5,
        histograms: bool = True,
        histogram_every_n_steps: int | None = None,
        print_table: bool = True,
        table_rows: int = 10,
        prefix: str = "shampoo",
        prog_bar: bool = False,
    ) -> None:
        require_int("log_every_n_steps", log_every_n_steps, low=1, allow_none=True)
        if not (top_k is None or top_k == "all" or (isinstance(top_k, int) and not isinstance(top_k, bool))):
            raise ValueError(f'top_k must be an int >= 0, "all" or None, got {describe(top_k)}')
        if isinstance(top_k, int):
            require_int("top_k", top_k, low=0)
        require_bool("histograms", histograms)
        require_int("histogram_every_n_steps", histogram_every_n_steps, low=1, allow_none=True)
        require_bool("print_table", print_table)
        require_int("table_rows", table_rows, low=1)
        require_str("prefix", prefix)
        require_bool("prog_bar", prog_bar)
        self._requested_every = log_every_n_steps
        self.log_every_n_steps = log_every_n_steps or 50
        self.top_k = top_k
        self.histograms = histograms
        self.histogram_every_n_steps = histogram_every_n_steps
        self.print_table_at_end = print_table
        self.table_rows = table_rows
        self.prefix = prefix
        self.prog_bar = prog_bar
        #: The last 1000 logged ``{key: value}`` with their ``"step"`` (identical on all ranks).
        self.history: deque[dict[str, float]] = deque(maxlen=1000)
        self._reported: dict[int, list[str]] = {}  # optimizer index -> layers with per-layer keys
        self._last_step = -1
        self._warned = False

    # ----------------------------------------------------------------------------- lightning

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        every = getattr(trainer, "log_every_n_steps", 0)  # set by the logger connector
        if self._requested_every is None:
            self.log_every_n_steps = every or 50
        if stage != "fit" or not every or self.log_every_n_steps == every:
            return
        mine = f"PreconditionerHealthMonitor(log_every_n_steps={self.log_every_n_steps})"
        if self.log_every_n_steps % every:
            rank_zero_warn(
                f"{mine} is not a multiple of Trainer(log_every_n_steps={every}): Lightning writes the "
                "health metrics to the loggers only on steps that are both; the others are lost."
            )
        else:
            rank_zero_warn(
                f"{mine} is coarser than Trainer(log_every_n_steps={every}): Lightning repeats the last "
                "health figures on the trainer's logging steps in between; equal cadences give exact curves."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.log_every_n_steps:
            return  # not a logging step (or a gradient-accumulation batch that did not step)
        self._last_step = step
        optimizers = self._optimizers(trainer)
        logged: dict[str, float] = {}
        for i, opt in optimizers:
            snapshot = gather_trainer_health(trainer, opt)
            prefix = self.prefix if i == optimizers[0][0] else f"{self.prefix}/opt{i}"
            logged.update(health_metrics(snapshot, prefix, self._layers(i, snapshot)))
            histogram_every = self.histogram_every_n_steps or self.log_every_n_steps
            if self.histograms and trainer.is_global_zero and step % histogram_every == 0:
                self._log_histograms(trainer, opt, prefix, step)
        if logged:
            pl_module.log_dict(
                logged, on_step=True, on_epoch=False, prog_bar=self.prog_bar, logger=bool(trainer.loggers)
            )
            self.history.append({"step": float(step), **logged})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.print_table_at_end:
            self.print_table(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"reported_layers": {str(i): list(v) for i, v in self._reported.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reported = {int(i): list(v) for i, v in state_dict.get("reported_layers", {}).items()}

    # ------------------------------------------------------------------------------- on demand

    def print_table(
        self, trainer: pl.Trainer, console: Console | None = None, rows: int | None = None
    ) -> list[Table]:
        """Print the worst blocks of each Shampoo optimizer (rank 0) and return the tables.
        Collective under DDP: call it on every rank."""
        tables: list[Table] = []
        for i, opt in self._optimizers(trainer):
            snapshot = gather_trainer_health(trainer, opt)
            if not trainer.is_global_zero:
                continue
            title = None if not tables else f"Shampoo optimizer {i}: preconditioner health"
            table = render_health_table(snapshot.records, rows or self.table_rows, title)
            (console or default_console()).print(table)
            tables.append(table)
        return tables

    # ------------------------------------------------------------------------------- internals

    def _optimizers(self, trainer: pl.Trainer) -> list[tuple[int, Shampoo]]:
        found = shampoo_optimizers(trainer.optimizers)
        if not found and not self._warned:
            self._warned = True
            rank_zero_warn("PreconditionerHealthMonitor: no Shampoo optimizer in this run to monitor")
        return found

    def _layers(self, index: int, snapshot: HealthSnapshot) -> list[str]:
        if not self.top_k:
            return []
        if self.top_k == "all":
            return list(dict.fromkeys(r.param_name for r in snapshot.records))
        reported = self._reported.setdefault(index, [])
        for name in worst_layers(snapshot.records, self.top_k):
            if name not in reported:
                reported.append(name)
        return reported

    def _log_histograms(self, trainer: pl.Trainer, optimizer: Shampoo, prefix: str, step: int) -> None:
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        for (name, factor), values in optimizer.factor_spectra().items():
            tag = f"{prefix}_spectra/{name}/factor{factor}_log10_eigenvalues"
            data = values.clamp_min(torch.finfo(values.dtype).tiny).log10()
            for writer in writers:
                writer.add_histogram(tag, data, global_step=step)
