"""Convergence benchmark: steps and wall-clock to AdamW's loss, for every preset and the peers.

Five small tasks (``_tasks.py``: an MLP and a CNN on scikit-learn's digits, a deep autoencoder on
the digits, a byte-level transformer LM on the Python standard library's sources, and ``word_lm``,
an embedding-heavy LM over a 4096-token synthetic corpus) run through
Lightning on the CPU, the way users run them: the module returns AdamW (baseline), AdamW with
``Trainer(callbacks=[ShampooCallback()])`` (the drop-in), ``configure_shampoo(self, preset)`` for
every preset, or a peer optimizer (``_optimizers.py``). Each optimizer gets the same 4-point
learning-rate sweep (×√10 apart, identical for every optimizer), and the best of each
(lowest final training loss, measured on a fixed evaluation set) is reported with its final
training and held-out loss, the steps and the measured training wall-clock to reach AdamW's best
final training loss, its optimizer-state memory and whether a non-finite value ever appeared.

    python benchmarks/convergence.py                 # the full suite; writes docs/convergence.md + PNGs
    python benchmarks/convergence.py --tasks mlp --optimizers adamw,shampoo,soap
    python benchmarks/convergence.py --quick         # CI smoke run: one task, few steps, asserts
    python benchmarks/convergence.py --report-only --tasks transformer --retime 3   # timing again
    python benchmarks/convergence.py --tasks mlp --optimizers adamw,shampoo,shampoo:averaging=schedule_free

Results are appended to ``<out>/results.jsonl`` as each run finishes, and a rerun skips the runs
already there (so an interrupted suite resumes). Set ``OMP_NUM_THREADS=1`` on small machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _optimizers import DEFAULT_OPTIMIZERS, PEERS, Spec, make_spec, peer_status, state_bytes
from _report import best_lrs, first_reaching, plot_task, seed_table, summarise, table_markdown, write_report
from _tasks import TASKS, Task, mlp_task

from lightning_shampoo import Shampoo

ROOT = Path(__file__).resolve().parent.parent
#: A run stops early (and counts as diverged) when its training loss exceeds this × the initial one.
BLOW_UP = 3.0


class BenchModule(pl.LightningModule):
    """The task's model, loss and data; ``configure_optimizers`` is the optimizer under test."""

    def __init__(self, task: Task, spec: Spec, lr: float) -> None:
        super().__init__()
        self.task, self.spec, self.lr = task, spec, lr
        self.net = task.model()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.task.loss(self.net, tuple(batch))

    def train_dataloader(self) -> Any:
        return self.task.loader()

    def configure_optimizers(self) -> Any:
        return self.spec.configure(self, self.lr, self.task.steps, self.task.warmup)


class Recorder(pl.Callback):
    """Times each training step (batch start to batch end: forward, backward, optimizer step) and
    every ``eval_every`` steps records the losses on the fixed evaluation sets (untimed)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.records: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.step_seconds: list[float] = []
        self.pending: list[torch.Tensor] = []
        self.nonfinite = False
        self.blew_up = False
        self._began = 0.0

    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        net = module.net  # type: ignore[attr-defined]
        averaged = [o for o in trainer.optimizers if isinstance(o, Shampoo) and o.averaging]
        for optimizer in averaged:  # iterate averaging: the averaged weights are the model
            optimizer.eval()
        net.eval()
        with torch.no_grad():
            train = float(self.task.loss(net, self.task.train_eval))
            val = float(self.task.loss(net, self.task.val))
        net.train()
        for optimizer in averaged:
            optimizer.train()
        finite = math.isfinite(train) and math.isfinite(val)
        finite &= all(bool(torch.isfinite(p).all()) for p in net.parameters())
        if self.pending:
            finite &= bool(torch.isfinite(torch.stack(self.pending)).all())
            self.pending.clear()
        step = trainer.global_step
        self.records.append({"step": step, "time": self.train_seconds, "train": train, "val": val})
        if not finite:
            self.nonfinite = True
        elif train > BLOW_UP * self.records[0]["train"]:
            self.blew_up = True
        if self.nonfinite or self.blew_up:
            trainer.should_stop = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._began = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        seconds = time.perf_counter() - self._began
        self.train_seconds += seconds
        self.step_seconds.append(seconds)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.pending.append(loss.detach())
        step = trainer.global_step
        if step % self.task.eval_every == 0 or step >= self.task.steps:
            self.evaluate(trainer, pl_module)


def bench_trainer(task: Task, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A quiet CPU trainer for ``task.steps`` training steps (no logger, no checkpoints)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=task.steps,
        max_epochs=-1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def run_one(task: Task, spec: Spec, lr: float) -> dict[str, Any]:
    """Train ``task`` with ``spec`` at ``lr``; the run's record (JSON-serialisable)."""
    recorder = Recorder(task)
    module = BenchModule(task, spec, lr)
    trainer = bench_trainer(task, [recorder, *spec.callbacks()])
    error = None
    try:
        trainer.fit(module)
    except Exception as exc:  # an optimizer that crashes (a peer's SVD on NaN) is a diverged run
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    records = recorder.records
    final = records[-1]
    initial = records[0]["train"]
    diverged = (
        error is not None
        or recorder.nonfinite
        or recorder.blew_up
        or not (final["train"] < initial)
        or final["step"] < task.steps
    )
    return {
        "task": task.name,
        "optimizer": spec.name,
        "lr": lr,
        "steps": task.steps,
        "seed": task.seed,
        "records": records,
        "final_train": final["train"],
        "final_val": final["val"],
        "initial_train": initial,
        "nonfinite": recorder.nonfinite,
        "error": error,
        "diverged": diverged,
        "train_seconds": recorder.train_seconds,
        "median_step_ms": 1e3 * statistics.median(recorder.step_seconds)
        if recorder.step_seconds
        else math.nan,
        "state_bytes": state_bytes(trainer.optimizers[0]),
    }


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_shampoo"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(run: dict[str, Any]) -> tuple[Any, ...]:
    return run["task"], run["optimizer"], run["lr"], run["steps"], run.get("seed", 0)


Plan = list[tuple[Task, str, float]]


def sweep_plan(tasks: list[Task], optimizers: list[str], lr_index: list[int] | None = None) -> Plan:
    """Every (task, optimizer, lr) of the sweep; the lrs loop outside the optimizers, so each
    optimizer's run follows AdamW's at the same grid point (under similar machine load)."""
    plan = []
    for task in tasks:
        for i in lr_index if lr_index is not None else range(len(task.lrs)):
            plan += [(task, name, task.lrs[i]) for name in optimizers]
    return plan


def seed_plan(tasks: list[Task], optimizers: list[str], seeds: list[int], runs: list[dict[str, Any]]) -> Plan:
    """Each optimizer at its best seed-0 learning rate, with other seeds (initial weights and
    data order): how much of a step ratio is the seed's luck."""
    plan = []
    for task in tasks:
        mine = [r for r in runs if (r["task"], r["steps"], r.get("seed", 0)) == (task.name, task.steps, 0)]
        best = best_lrs(summarise(mine, optimizers)[0])
        for seed in seeds:
            seeded = replace(task, seed=seed)
            plan += [(seeded, name, best[name]) for name in optimizers if name in best]
    return plan


def retime(tasks: list[Task], names: list[str], runs: list[dict[str, Any]], repeats: int) -> str:
    """Wall-clock to AdamW's target again, ``repeats`` times, each optimizer at its best seed-0 lr
    and in rounds (every optimizer once per round, so slow machine phases hit all alike): the
    median and each round's time, as markdown. Steps are deterministic; only the clock varies."""
    lines = [
        f"Wall-clock to AdamW's best final loss, {repeats} rounds (median; each round's seconds):",
        "",
        "| task | optimizer | lr | steps | median s | ×AdamW | rounds |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for task in tasks:
        mine = [r for r in runs if (r["task"], r["steps"], r.get("seed", 0)) == (task.name, task.steps, 0)]
        rows, target = summarise(mine, names)
        best = best_lrs(rows)
        seconds: dict[str, list[float]] = {n: [] for n in names if n in best}
        steps: dict[str, int] = {}
        for _ in range(repeats):
            for name in seconds:
                hit = first_reaching(run_one(task, make_spec(name), best[name]), target)
                if hit is not None:
                    seconds[name].append(hit["time"])
                    steps[name] = int(hit["step"])
        base = statistics.median(seconds["adamw"]) if seconds.get("adamw") else math.nan
        for name, values in seconds.items():
            if not values:
                continue
            median = statistics.median(values)
            rounds = ", ".join(f"{v:.1f}" for v in values)
            lines.append(
                f"| {task.name} | {name} | {best[name]:.3g} | {steps[name]} | {median:.1f} "
                f"| {median / base:.2f} | {rounds} |"
            )
    return "\n".join(lines)


def execute(plan: Plan, out: Path) -> list[dict[str, Any]]:
    """Run what ``out/results.jsonl`` does not have yet; every run is appended as it finishes."""
    path = out / "results.jsonl"
    runs = _load(path)
    done = {_key(r) for r in runs}
    for task, name, lr in plan:
        key = (task.name, name, lr, task.steps, task.seed)
        if key in done:
            continue
        began = time.perf_counter()
        run = run_one(task, make_spec(name), lr)
        runs.append(run)
        done.add(key)
        with path.open("a") as f:
            f.write(json.dumps(run) + "\n")
        flag = (" DIVERGED" if run["diverged"] else "") + (f" ({run['error']})" if run["error"] else "")
        print(
            f"{task.name:12s} {name:28s} seed {task.seed} lr {lr:<8.3g} train {run['final_train']:.4f} "
            f"val {run['final_val']:.4f} {run['median_step_ms']:6.1f} ms/step "
            f"({time.perf_counter() - began:5.1f} s){flag}",
            flush=True,
        )
    return runs


def quick(out: Path) -> int:
    """The CI smoke run: the MLP task for a few steps with AdamW, the drop-in and the Shampoo and
    SOAP presets at one learning rate; fails unless every one of ours ends finite and below its
    initial loss."""
    task = mlp_task(steps=60)
    task.warmup = 3
    names = ["adamw", "shampoo_callback", "shampoo", "soap"]
    runs = execute(sweep_plan([task], names, lr_index=[2]), out)
    rows, target = summarise([r for r in runs if r["steps"] == task.steps], names)
    print(table_markdown(rows, target))
    failures = [
        f"{r['optimizer']}: initial {r['initial_train']:.4f}, final {r['final_train']}"
        for r in runs
        if r["optimizer"] != "adamw" and (not math.isfinite(r["final_train"]) or r["diverged"])
    ]
    if failures:
        print("FAILED: loss not finite or not below its initial value:\n  " + "\n  ".join(failures))
        return 1
    print("quick run OK: every Shampoo-family loss is finite and below its initial value")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke run (one task, few steps)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument(
        "--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help="comma-separated (name[:overrides];…)"
    )
    parser.add_argument("--lr-index", default=None, help="comma-separated grid indices (0-3) to run")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default runs/…)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the report and plots go")
    parser.add_argument("--no-report", action="store_true", help="do not write the docs")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the results file")
    parser.add_argument(
        "--seeds", default="", help="extra seeds (e.g. 1,2): rerun --seed-optimizers at their best lr"
    )
    parser.add_argument("--seed-optimizers", default="adamw,shampoo_callback,shampoo,soap")
    parser.add_argument(
        "--retime",
        type=int,
        default=0,
        help="rerun --seed-optimizers N times at their best lr and print the median wall-clock to target",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _quiet()
    if args.quick:
        out = args.out or ROOT / "runs" / "convergence_quick"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").unlink(missing_ok=True)
        return quick(out)
    out = args.out or ROOT / "runs" / "convergence"
    out.mkdir(parents=True, exist_ok=True)
    separator = ";" if ";" in args.optimizers else ","
    names = [n.strip() for n in args.optimizers.split(separator) if n.strip()]
    status = peer_status()
    skipped = {n: s for n, s in status.items() if s != "ok" and n in names}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    names = [n for n in names if n not in skipped]
    tasks = [TASKS[t.strip()]() for t in args.tasks.split(",") if t.strip()]
    lr_index = None if args.lr_index is None else [int(i) for i in args.lr_index.split(",")]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    seed_names = [n for n in args.seed_optimizers.split(",") if n in names]
    if args.report_only:
        runs = _load(out / "results.jsonl")
    else:
        runs = execute(sweep_plan(tasks, names, lr_index), out)
        if seeds:
            runs = execute(seed_plan(tasks, seed_names, seeds, runs), out)
    if args.retime:
        print(retime(tasks, seed_names, runs, args.retime))
        return 0
    if args.no_report:
        return 0
    by_task = {}
    for task in tasks:
        mine = [r for r in runs if r["task"] == task.name and r["steps"] == task.steps]
        indices = lr_index if lr_index is not None else range(len(task.lrs))
        grid = {(n, task.lrs[i]) for n in names for i in indices}
        first = [r for r in mine if r.get("seed", 0) == 0 and (r["optimizer"], r["lr"]) in grid]
        order = [n for n in names if any(r["optimizer"] == n for r in first)]
        rows, target = summarise(first, order)
        checked = seed_table(mine, seed_names, [0, *seeds]) if seeds else ""
        print(f"\n## {task.name}\n\n{table_markdown(rows, target)}\n\n{checked}")
        plot = plot_task(task, first, rows, args.docs / f"convergence_{task.name}.png")
        by_task[task.name] = (task, rows, target, plot, checked)
    peers = {n: status.get(n, "not run") for n in PEERS}
    write_report(args.docs / "convergence.md", by_task, peers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
