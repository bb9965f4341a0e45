"""``PreconditionerHealthMonitor``: preconditioner health in every Lightning logger.

Health is read only on the monitor's logging steps (``optimizer.health()`` synchronises with the
device), and it reaches every rank through one summed collective (see ``_health_table``), so every
rank holds the same keys with the same values. The figures go straight to ``trainer.loggers`` at
the step of the batch's training metrics (``_logging``), so the monitor's cadence is its own.

Why not torchmetrics: a health snapshot is not a metric accumulated over batches, and
torchmetrics synchronises each state with its own collective (``cat`` states for a median are an
all-gather of ragged lists), while counting each block exactly once needs ownership-aware
filling of a single table; one summed ``all_reduce`` of that table does it in one call.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.console import Console
from rich.table import Table

from .._checks import describe, require_bool, require_int, require_str
from ..health import BlockHealth, summarize
from ..optim import Shampoo
from ._health_table import HealthSnapshot, gather_trainer_health, shampoo_optimizers
from ._logging import batches_that_stepped, cadence, is_due, write_metrics

__all__ = [
    "HISTOGRAM_EVERY_N_LOGS",
    "PreconditionerHealthMonitor",
    "first_refresh_steps",
    "health_metrics",
    "never_preconditioned",
    "render_health_table",
]

#: Default histogram cadence, in logging steps of the monitor (see ``histograms``).
HISTOGRAM_EVERY_N_LOGS = 10

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


def first_refresh_steps(optimizer: Shampoo) -> dict[int, float]:
    """Each param group's first scheduled refresh: its ``start_preconditioning_step`` (resolved at
    construction; ``inf``: never). Before it a block takes its grafting direction alone."""
    return {g: float(group["start_preconditioning_step"]) for g, group in enumerate(optimizer.param_groups)}


def _at(step: float) -> str:
    return f"step {int(step)}" if math.isfinite(step) else "no step (start_preconditioning_step=inf)"


def _never(record: BlockHealth, first_refresh: Mapping[int, float]) -> str:
    """Why a factored block has never been refreshed, as short as the table's column allows."""
    due = first_refresh.get(record.group, math.nan)
    if record.step < due:
        return f"never (first refresh at {_at(due)})"
    return "never (every refresh failed)" if record.failure_count else "never"


def never_preconditioned(records: Sequence[BlockHealth], first_refresh: Mapping[int, float]) -> str | None:
    """A sentence saying why, when no block with Kronecker factors was ever refreshed (so every
    block took its grafting direction: the wrapped optimizer's update); ``None`` otherwise."""
    factored = [r for r in records if r.condition_numbers]
    if not factored or any(r.last_refresh_step >= 0 for r in factored):
        return None
    step = max(r.step for r in factored)
    due = min(first_refresh.get(r.group, math.nan) for r in factored)
    if step < due:
        why = f"the run stopped at step {step}, before the first refresh at {_at(due)}"
        hint = "; train longer or lower start_preconditioning_step"
    elif any(r.failure_count for r in factored):
        why, hint = "every refresh failed (see the failures column)", ""
    else:
        why, hint = "no refresh has run yet", ""
    return f"no block was preconditioned: {why}; every block took its grafting direction{hint}"


def render_health_table(
    records: Sequence[BlockHealth],
    rows: int = 10,
    title: str | None = None,
    first_refresh: Mapping[int, float] | None = None,
) -> Table:
    """A ``rich`` table of the ``rows`` worst blocks (trouble first, then condition number).
    ``stale``: steps since the block's last successful refresh, or why it has none
    (``first_refresh``: :func:`first_refresh_steps`); ``ε×``: its damping multiplier."""
    first_refresh = first_refresh or {}
    worst = sorted(records, key=lambda r: _badness([r]), reverse=True)[:rows]
    step = max((r.step for r in records), default=0)
    summary = summarize(records)
    cond_max, cond_median = summary["condition_number_max"], summary["condition_number_median"]
    caption = (
        f"κ max {_fmt(cond_max)}, median {_fmt(cond_median)}"
        f" · failures {int(summary['failures'])} · non-finite grads {int(summary['nonfinite_grads'])}"
        f" · blocks in fallback {int(summary['blocks_in_fallback'])}"
    )
    if note := never_preconditioned(records, first_refresh):
        caption += f"\n{note}"
    table = Table(
        title=title or f"Shampoo preconditioner health at step {step}: worst {len(worst)} of {len(records)}",
        caption=caption,
    )
    for column in ("layer", "block", "shape", "preconditioner"):
        table.add_column(column, overflow="fold")
    for column in ("κ max", "λ min", "λ max", "failures", "non-finite", "stale", "ε×"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("fallback", no_wrap=True)
    for r in worst:
        since = r.steps_since_refresh
        stale = "—" if not r.condition_numbers else _never(r, first_refresh) if since is None else str(since)
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
    """Logs Shampoo's per-block health under ``shampoo/…`` to every logger of the trainer.

    Args:
        log_every_n_steps: log every this many training steps (batches whose optimizer stepped:
            the unit of ``Trainer(log_every_n_steps)``); ``None`` (default): the trainer's. Any
            cadence works: the figures go to the loggers directly, at the step of the same
            batch's training metrics, and are never repeated on later steps.
        top_k: per-layer detail: the ``k`` worst layers (a layer once reported stays reported, so
            its curve has neither gaps nor stale points), ``"all"`` layers, or ``None``/``0``.
        histograms: with a TensorBoard logger, log each layer's factor eigenvalue spectra
            (``log10``) every ``histogram_every_n_steps`` (default: every
            ``HISTOGRAM_EVERY_N_LOGS``-th logging step: a layer's spectrum costs an ``eigvalsh`` of
            each factor, about half a refresh, which at every logging step was 4% of the digits
            CNN's training time at the trainer's cadence and 18% at every 10 steps); rank 0
            writes them, from the blocks it holds (all of them unless the optimizer is sharded).
        print_table: print a ``rich`` table of the ``table_rows`` worst blocks when training
            ends (rank 0); ``print_table()`` does it on demand.
        prefix: metric namespace; a second Shampoo optimizer logs under ``{prefix}/opt{i}/…``.
        prog_bar: also show the overall figures in the progress bar.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
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
        self.log_every_n_steps = log_every_n_steps
        self.top_k = top_k
        self.histograms = histograms
        self.histogram_every_n_steps = histogram_every_n_steps
        self.print_table_at_end = print_table
        self.table_rows = table_rows
        self.prefix = prefix
        self.prog_bar = prog_bar
        #: The last 1000 logged ``{key: value}`` with their ``"step"`` (``trainer.global_step``;
        #: the loggers get them at Lightning's step of that batch), identical on all ranks.
        self.history: deque[dict[str, float]] = deque(maxlen=1000)
        #: Who put this monitor in the trainer (``ShampooCallback`` names itself), for messages.
        self.added_by: str | None = None
        self._reported: dict[int, list[str]] = {}  # optimizer index -> layers with per-layer keys
        self._last_step = -1
        self._warned = False

    # ----------------------------------------------------------------------------- lightning

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step:
            return  # a gradient-accumulation batch: no optimizer stepped
        self._last_step = step
        every = cadence(trainer, self.log_every_n_steps)
        if not is_due(trainer, every):
            return
        optimizers = self._optimizers(trainer)
        logged: dict[str, float] = {}
        histogram_every = self.histogram_every_n_steps or HISTOGRAM_EVERY_N_LOGS * every
        for i, opt in optimizers:
            snapshot = gather_trainer_health(trainer, opt)
            prefix = self.prefix if i == optimizers[0][0] else f"{self.prefix}/opt{i}"
            logged.update(health_metrics(snapshot, prefix, self._layers(i, snapshot)))
            if self.histograms and trainer.is_global_zero and is_due(trainer, histogram_every):
                self._log_histograms(trainer, opt, prefix, batches_that_stepped(trainer))
        if logged:
            write_metrics(trainer, logged, prog_bar=self.prog_bar)
            self.history.append({"step": float(step), **logged})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The health table (rank 0), and a note when Shampoo never preconditioned (a collective
        under DDP; every rank runs this hook)."""
        for n, (i, opt) in enumerate(self._optimizers(trainer)):
            snapshot = gather_trainer_health(trainer, opt)
            if note := never_preconditioned(snapshot.records, first_refresh_steps(opt)):
                rank_zero_info(f"Shampoo{f' optimizer {i}' if n else ''}: {note}")
            if self.print_table_at_end and trainer.is_global_zero:
                self._print(opt, i, snapshot, first=n == 0)

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
        for n, (i, opt) in enumerate(self._optimizers(trainer)):
            snapshot = gather_trainer_health(trainer, opt)
            if trainer.is_global_zero:
                tables.append(self._print(opt, i, snapshot, first=n == 0, console=console, rows=rows))
        return tables

    def _print(
        self,
        optimizer: Shampoo,
        index: int,
        snapshot: HealthSnapshot,
        *,
        first: bool,
        console: Console | None = None,
        rows: int | None = None,
    ) -> Table:
        title = None if first else f"Shampoo optimizer {index}: preconditioner health"
        rows = rows or self.table_rows
        table = render_health_table(snapshot.records, rows, title, first_refresh_steps(optimizer))
        (console or default_console()).print(table)
        return table

    # ------------------------------------------------------------------------------- internals

    def _optimizers(self, trainer: pl.Trainer) -> list[tuple[int, Shampoo]]:
        found = shampoo_optimizers(trainer.optimizers)
        if not found and not self._warned:
            self._warned = True
            if self.added_by is None:
                rank_zero_warn("PreconditionerHealthMonitor: no Shampoo optimizer in this run to monitor")
            else:  # not the user's component: no warning about it, a note
                rank_zero_info(f"{self.added_by}'s health monitor: no Shampoo optimizer in this run")
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
