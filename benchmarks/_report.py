"""Summaries, markdown tables and plots of the convergence suite's runs (``convergence.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _optimizers import OURS

BEGIN, END = (
    "<!-- convergence results: begin (written by benchmarks/convergence.py) -->",
    ("<!-- convergence results: end -->"),
)


#: Losses are compared as running means over this many evaluations (the last 50 steps on the
#: digits tasks, 100 on the transformer): at a constant learning rate the loss of one evaluation
#: bounces (on the MLP at lr 1e-2 between 0.04 and 0.23 within 100 steps), and a single point
#: would make the best lr and the target a lottery.
WINDOW = 5
#: Relative slack of "reached": an optimizer that retraces AdamW (the ``adam`` preset) reaches
#: AdamW's loss despite rounding in the last digits.
TOLERANCE = 1e-4


def smoothed(run: dict[str, Any], key: str = "train") -> list[float]:
    """Running mean of ``key`` over the last ``WINDOW`` evaluations (fewer at the start)."""
    values = [r[key] for r in run["records"]]
    return [
        sum(values[max(0, i - WINDOW + 1) : i + 1]) / (i + 1 - max(0, i - WINDOW + 1))
        for i in range(len(values))
    ]


def final(run: dict[str, Any], key: str = "train") -> float:
    return smoothed(run, key)[-1]


def first_reaching(run: dict[str, Any], target: float) -> dict[str, float] | None:
    """The first evaluation record at which the smoothed training loss is at or below ``target``
    (within ``TOLERANCE``)."""
    for record, value in zip(run["records"], smoothed(run)):
        if value <= target * (1 + TOLERANCE):
            return record
    return None


def summarise(runs: list[dict[str, Any]], names: list[str]) -> tuple[list[dict[str, Any]], float]:
    """One row per optimizer: its best run (lowest final training loss among the learning rates
    where it did not diverge) against AdamW's best final training loss (the target)."""
    by_name: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for run in runs:
        if run["optimizer"] in by_name:
            by_name[run["optimizer"]].append(run)

    def best(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        alive = [r for r in candidates if not r["diverged"]]
        return min(alive, key=final) if alive else None

    baseline = best(by_name.get("adamw", []))
    target = final(baseline) if baseline else math.nan
    base_hit = first_reaching(baseline, target) if baseline else None
    adam_ok = {r["lr"] for r in by_name.get("adamw", []) if not r["diverged"]}
    rows = []
    for name in names:
        candidates = sorted(by_name[name], key=lambda r: r["lr"])
        if not candidates:
            continue
        run = best(candidates)
        row: dict[str, Any] = {
            "optimizer": name,
            "lrs": [r["lr"] for r in candidates],
            "diverged_lrs": [r["lr"] for r in candidates if r["diverged"]],
            "diverged_where_adamw_ok": [r["lr"] for r in candidates if r["diverged"] and r["lr"] in adam_ok],
            "nonfinite_any": any(r["nonfinite"] for r in candidates),
            "run": run,
        }
        if run is not None:
            hit = first_reaching(run, target)
            row.update(
                lr=run["lr"],
                final_train=final(run),
                final_val=final(run, "val"),
                nonfinite=run["nonfinite"],
                state_bytes=run["state_bytes"],
                ms_per_step=1e3 * run["train_seconds"] / max(1, run["records"][-1]["step"]),
                steps_to_target=hit["step"] if hit else None,
                time_to_target=hit["time"] if hit else None,
            )
            if hit and base_hit:
                row["step_ratio"] = hit["step"] / max(1, base_hit["step"])
                row["time_ratio"] = hit["time"] / base_hit["time"] if base_hit["time"] > 0 else math.nan
        rows.append(row)
    return rows, target


def best_lrs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``{optimizer: learning rate of its best run}`` from ``summarise``'s rows (optimizers that
    diverged at every learning rate are left out)."""
    return {row["optimizer"]: row["lr"] for row in rows if row["run"] is not None}


def seed_table(runs: list[dict[str, Any]], names: list[str], seeds: list[int]) -> str:
    """Steps to AdamW's final loss (×AdamW's) per seed, each optimizer at its best seed-0 lr."""
    header = "| optimizer | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    lines = [
        "Seed check (each at its seed-0 best lr; target: AdamW's final training loss with the same seed; "
        "steps to target ×AdamW's):",
        "",
        header,
        "|---|" + "---:|" * len(seeds),
    ]
    cells: dict[str, list[str]] = {n: [] for n in names}
    best = best_lrs(summarise([r for r in runs if r.get("seed", 0) == 0], names)[0])
    for seed in seeds:
        seeded = [r for r in runs if r.get("seed", 0) == seed]
        picked = [r for r in seeded if best.get(r["optimizer"]) == r["lr"]]
        rows, _ = summarise(picked, names)
        found = {row["optimizer"]: row for row in rows}
        for name in names:
            row = found.get(name)
            if row is None or row["run"] is None:
                cells[name].append("–" if row is None else "diverged")
            elif row.get("step_ratio") is None:
                cells[name].append(f"not reached ({row['final_train']:.4f})")
            else:
                cells[name].append(f"{row['step_ratio']:.2f}× ({row['final_train']:.4f})")
    lines += [f"| {n} | " + " | ".join(c) + " |" for n, c in cells.items()]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _lrs(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values) if values else "–"


def table_markdown(rows: list[dict[str, Any]], target: float) -> str:
    """The results table of one task (markdown)."""
    lines = [
        f"Target: AdamW's best final training loss **{target:.4f}** (losses: means of the last {WINDOW} "
        "evaluations).",
        "",
        "| optimizer | best lr | final train | final eval | steps to target (×AdamW) "
        "| time to target (×AdamW) | ms/step | optimizer state | diverged at lr | non-finite |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        if row["run"] is None:
            lines.append(
                f"| {row['optimizer']} | – | – | – | – | – | – | – | all ({_lrs(row['diverged_lrs'])}) "
                f"| {'yes' if row['nonfinite_any'] else 'no'} |"
            )
            continue
        steps = "not reached"
        seconds = "–"
        if row["steps_to_target"] is not None:
            steps = f"{row['steps_to_target']} ({row.get('step_ratio', math.nan):.2f}×)"
            seconds = f"{row['time_to_target']:.1f} s ({row.get('time_ratio', math.nan):.2f}×)"
        nonfinite = "yes" if row["nonfinite"] else ("in sweep" if row["nonfinite_any"] else "no")
        lines.append(
            f"| {row['optimizer']} | {row['lr']:.3g} | {row['final_train']:.4f} | {row['final_val']:.4f} "
            f"| {steps} | {seconds} | {row['ms_per_step']:.1f} | {_bytes(row['state_bytes'])} "
            f"| {_lrs(row['diverged_lrs'])} | {nonfinite} |"
        )
    return "\n".join(lines)


def plot_task(task: Any, runs: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> Path:
    """Training loss of each optimizer's best run against steps and against training wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    colors = plt.get_cmap("tab20")
    target = next((r["final_train"] for r in rows if r["optimizer"] == "adamw" and r["run"]), None)
    for i, row in enumerate(rows):
        run = row["run"]
        if run is None:
            continue
        steps = [r["step"] for r in run["records"]]
        seconds = [r["time"] for r in run["records"]]
        loss = smoothed(run)
        peer = "_" in row["optimizer"] and row["optimizer"].split("_")[0] in ("hb", "po", "kron")
        style = dict(
            color="black" if row["optimizer"] == "adamw" else colors(i % 20),
            linestyle="--" if peer else "-",
            linewidth=2.2 if row["optimizer"] in ("adamw", "shampoo", "soap", "shampoo_callback") else 1.2,
            label=f"{row['optimizer']} (lr {row['lr']:.3g})",
        )
        axes[0].plot(steps, loss, **style)
        axes[1].plot(seconds, loss, **style)
    for ax, xlabel in zip(axes, ("optimizer step", "training wall-clock (s, measured)")):
        if target is not None:
            ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlabel=xlabel, ylabel=f"training loss (running mean of {WINDOW} evaluations)", yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"{task.name}: loss vs step (best lr of each)")
    axes[1].set_title(f"{task.name}: loss vs wall-clock")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: The issue's targets: steps to AdamW's loss ≤ this × AdamW's for the default Shampoo and SOAP.
STEP_TARGET = 0.6
TARGETED = ("shampoo_callback", "shampoo", "soap")


def targets_markdown(by_task: dict[str, Any]) -> str:
    """Steps (and, on the transformer, wall-clock) to AdamW's loss for the default recipes,
    against the targets; and whether any of the package's optimizers ever saw a non-finite value."""
    lines = [
        "| task | " + " | ".join(f"{n}: steps ×AdamW" for n in TARGETED) + " | wall-clock ×AdamW |",
        "|---|" + "---:|" * (len(TARGETED) + 1),
    ]
    nonfinite, ours = [], set(OURS)
    for task, (_, rows, _, _, _) in by_task.items():
        found = {row["optimizer"]: row for row in rows}
        cells = []
        for opt in TARGETED:
            ratio = found.get(opt, {}).get("step_ratio")
            cells.append("–" if ratio is None else f"{ratio:.2f} {'✓' if ratio <= STEP_TARGET else '✗'}")
        times = [f"{o} {found[o]['time_ratio']:.2f}" for o in TARGETED if found.get(o, {}).get("time_ratio")]
        cells.append(", ".join(times) if times else "–")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
        bad = [r["optimizer"] for r in rows if r["optimizer"] in ours and r["nonfinite_any"]]
        nonfinite += [f"{task}/{name}" for name in bad]
    seen = ", ".join(nonfinite) or "none"
    lines += ["", f"Non-finite values in any run of the package's optimizers: {seen}."]
    return "\n".join(lines)


def write_report(path: Path, by_task: dict[str, Any], peers: dict[str, str]) -> None:
    """Replace the generated block of ``path`` (between the markers) with the tables and plots."""
    parts = [BEGIN, "", "### Targets", "", targets_markdown(by_task), ""]
    for name, (task, rows, target, plot, checked) in by_task.items():
        grid = ", ".join(f"{lr:.3g}" for lr in task.lrs)
        parts += [
            f"### {name}",
            "",
            f"{task.description}; {task.steps} steps (linear warmup {task.warmup}, then constant lr); "
            f"AdamW grid {grid}; losses every {task.eval_every} steps.",
            *(f"{k}: {v}." for k, v in task.notes.items()),
            "",
            table_markdown(rows, target),
            "",
            *([checked, ""] if checked else []),
            f"![{name}]({plot.name})",
            "",
        ]
    status = "; ".join(f"{n}: {s}" for n, s in peers.items())
    parts += [f"Peers: {status}.", "", END]
    block = "\n".join(parts)
    text = path.read_text() if path.exists() else "# Convergence benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
