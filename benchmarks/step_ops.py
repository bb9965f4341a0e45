"""Plain optimizer step: aten ops, time and optimizer state, against ``AdamW(foreach=True)``.

Models (one backward on a fixed random batch gives the gradients; every optimizer of a model
steps the same parameters with the same gradients):

* ``mlp`` — 64-128-128-10 tanh MLP with biases (digits-shaped input, batch 32);
* ``cnn`` — the convergence suite's digits CNN (two 3×3 convs, pool, two linear layers);
* ``transformer`` — 2-layer pre-norm transformer LM, vocabulary 4096, d_model 128, 4 heads,
  context 64 (1.45M parameters; issue 12's model), batch 8 × 64 tokens.

Optimizers: ``adamw`` = ``torch.optim.AdamW(foreach=True, weight_decay=0.01)`` over all
parameters (the baseline); ``callback`` = ``ShampooCallback().translate`` of an AdamW with decay
(matrices) and no-decay groups, i.e. the drop-in without a Trainer (so without its frequency
ramp); every ``configure_shampoo(module, preset, weight_decay=0.01)`` preset. The same decay for
all (``--weight-decay``): ``configure_shampoo``'s default is none, which saves the presets 30
(MLP) to 154 (transformer) top-level ops per step.

Each optimizer first takes ``WARMUP`` steps at its own settings: the Shampoo-family presets
start preconditioning and refresh first at step 10 (before it a step is the grafting optimizer
alone, with fewer ops), so the state is the steady state's; it is measured then. After that every group's
``precondition_frequency`` is set to 10⁹, so every measured step is a *plain* (non-refresh) step;
PSGD-Kron, which fits Q inside the step, keeps its preset's update schedule for the warm-up and
fits no more after it.

Counting rule: ``--steps`` plain steps under ``torch.profiler`` (CPU activity). An event is a
*top-level aten op* when its name starts with ``aten::`` and no event above it (the
``cpu_parent`` chain) is an ``aten::`` event: the ops the Python code dispatched itself, one per
``torch.*`` / ``Tensor.*`` call, a ``torch._foreach_*`` call being one op whatever its list
length. "all aten ops" also counts the nested ones (``aten::empty`` inside a foreach op,
``aten::copy_`` inside ``aten::to``, ...). Both are per step.

Time: ``--rounds`` rounds; in each, every optimizer runs ``--steps`` plain steps back to back,
AdamW first; "time ×AdamW" is the median over rounds of the ratio to AdamW's time in the same
round, "ms/step" the median time. State: ``optimizer.state_bytes()`` where the optimizer has one,
else the bytes of the distinct tensor storages reachable from ``optimizer.state`` (the
convergence suite's count). On CUDA the profile also gives kernel launches and host vs device
milliseconds per plain step (as ``step_profile.py`` reports them).

    OMP_NUM_THREADS=1 python benchmarks/step_ops.py
    python benchmarks/step_ops.py --device cuda --models transformer --json step_ops.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import TinyTransformerLM, lm_loss
from _optimizers import state_bytes as storage_bytes
from _tasks import _cnn
from step_profile import _profile, plain_steps_only, step_stats
from step_time import _sync

from lightning_shampoo import ScheduleFreeConfig, ShampooCallback, configure_shampoo
from lightning_shampoo.configure import resolve_preset

#: Steps at the optimizer's own settings before measuring (covers the presets' first refresh).
WARMUP = 12
PRESETS = ("shampoo", "soap", "eigen", "kl_shampoo", "psgd_kron", "muon", "adam")
OPTIMIZERS = ("adamw", "callback", *PRESETS)
#: Not measured by default: the drop-in and the shampoo preset with Schedule-Free averaging.
AVERAGED = ("callback_sf", "shampoo_sf")


# ---------------------------------------------------------------------------------- models


def _mlp(device: torch.device) -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    model.to(device)
    x, y = torch.randn(32, 64, device=device), torch.randint(0, 10, (32,), device=device)
    return model, nn.functional.cross_entropy(model(x), y)


def _conv(device: torch.device) -> tuple[nn.Module, Tensor]:
    model = _cnn().to(device)
    x, y = torch.randn(32, 1, 8, 8, device=device), torch.randint(0, 10, (32,), device=device)
    return model, nn.functional.cross_entropy(model(x), y)


def _transformer(device: torch.device) -> tuple[nn.Module, Tensor]:
    model = TinyTransformerLM(vocab=4096, d_model=128, layers=2, heads=4, seq=64).to(device)
    return model, lm_loss(model, torch.randint(0, 4096, (8, 65), device=device))


MODELS: dict[str, Callable[[torch.device], tuple[nn.Module, Tensor]]] = {
    "mlp": _mlp,
    "cnn": _conv,
    "transformer": _transformer,
}


# ------------------------------------------------------------------------------ optimizers


@dataclass(frozen=True)
class FitUntil:
    """PSGD-Kron update probability: ``schedule`` up to step ``last``, then 0 (plain steps)."""

    last: int
    schedule: Callable[[int], float] | float

    def __call__(self, step: int) -> float:
        if step > self.last:
            return 0.0
        return float(self.schedule(step)) if callable(self.schedule) else float(self.schedule)


def _decay_groups_adamw(module: nn.Module, decay: float) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    matrices = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": matrices}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, weight_decay=decay, foreach=True)


def make_optimizer(name: str, module: nn.Module, decay: float = 0.01) -> torch.optim.Optimizer:
    """Optimizer ``name`` (``OPTIMIZERS``) over ``module`` with weight decay ``decay``."""
    if name == "adamw":
        return torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=decay, foreach=True)
    if name == "callback":
        return ShampooCallback().translate(_decay_groups_adamw(module, decay), module)
    if name == "callback_sf":
        callback = ShampooCallback(iterate_averaging_config=ScheduleFreeConfig())
        return callback.translate(_decay_groups_adamw(module, decay), module)
    if name == "shampoo_sf":
        averaged = configure_shampoo(
            module, "shampoo", weight_decay=decay, iterate_averaging_config=ScheduleFreeConfig()
        )
        assert isinstance(averaged, torch.optim.Optimizer)
        return averaged
    if name not in PRESETS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {list(OPTIMIZERS + AVERAGED)}")
    preset: Any = name
    if name == "psgd_kron":
        config = resolve_preset(name).config
        preset = replace(
            config,
            preconditioner_update_probability=FitUntil(WARMUP, config.preconditioner_update_probability),
        )
    result = configure_shampoo(module, preset, weight_decay=decay)
    assert isinstance(result, torch.optim.Optimizer)  # no schedule asked for
    return result


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    method = getattr(optimizer, "state_bytes", None)
    return int(method()) if callable(method) else storage_bytes(optimizer)


# ----------------------------------------------------------------------------- measuring


def count_aten_ops(events: Any, steps: int) -> tuple[float, float]:
    """(top-level, all) ``aten::`` events per step of ``prof.events()`` (module docstring)."""
    top = total = 0
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        total += 1
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        top += parent is None
    return top / steps, total / steps


def interleaved_times(
    optimizers: dict[str, torch.optim.Optimizer], steps: int, rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per plain step of each optimizer in each round (all optimizers every round)."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            _sync(device)
            began = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            _sync(device)
            times[name].append((time.perf_counter() - began) / steps)
    return times


def measure_model(model_name: str, names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, loss = MODELS[model_name](device)
    loss.backward()
    optimizers, rows = {}, {}
    for name in names:
        optimizer = make_optimizer(name, model, args.weight_decay)
        for _ in range(WARMUP):
            optimizer.step()
        plain_steps_only(optimizer)
        optimizer.step()  # the first plain step (lazy buffers)
        prof = _profile(optimizer, args.steps, device)
        top, total = count_aten_ops(prof.events(), args.steps)
        row: dict[str, Any] = {"model": model_name, "optimizer": name, "top_ops": top, "all_ops": total}
        row["state_bytes"] = optimizer_state_bytes(optimizer)
        if device.type == "cuda":
            host, gpu, launches = step_stats(prof.key_averages(), args.steps)
            row.update(host_ms=host, device_ms=gpu, launches=launches)
        optimizers[name], rows[name] = optimizer, row
    times = interleaved_times(optimizers, args.steps, args.rounds, device)
    base = rows["adamw"]
    for name, row in rows.items():
        row["ms"] = 1e3 * statistics.median(times[name])
        row["time_ratio"] = statistics.median(t / a for t, a in zip(times[name], times["adamw"]))
        row["ops_ratio"] = row["top_ops"] / base["top_ops"]
        row["state_ratio"] = row["state_bytes"] / base["state_bytes"]
    params = sum(p.numel() for p in model.parameters())
    for row in rows.values():
        row["params"] = params
    return list(rows.values())


# ------------------------------------------------------------------------------ reporting


def table(rows: list[dict[str, Any]], cuda: bool) -> str:
    head = (
        "| optimizer | top-level aten ops | ops ×AdamW | all aten ops | ms/step | time ×AdamW "
        "| state | state ×AdamW |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if cuda:
        head += " kernel launches | host ms | device ms |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['optimizer']} | {r['top_ops']:.0f} | {r['ops_ratio']:.1f}× | {r['all_ops']:.0f} "
            f"| {r['ms']:.2f} | {r['time_ratio']:.1f}× | {r['state_bytes'] / 2**20:.2f} MiB "
            f"| {r['state_ratio']:.2f}× |"
        )
        if cuda:
            line += f" {r['launches']:.0f} | {r['host_ms']:.2f} | {r['device_ms']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--{what}: unknown {unknown}; choose from {list(known)}")
    return names


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated (adamw always)")
    parser.add_argument("--steps", type=int, default=10, help="plain steps profiled, and timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--weight-decay", type=float, default=0.01, help="of every optimizer")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be >= 1")
    models = _names(args.models, tuple(MODELS), "models")
    names = [
        "adamw",
        *(n for n in _names(args.optimizers, OPTIMIZERS + AVERAGED, "optimizers") if n != "adamw"),
    ]
    print(
        f"Plain optimizer step vs AdamW(foreach=True): torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds, "
        f"weight decay {args.weight_decay}"
    )
    results = []
    for model_name in models:
        rows = measure_model(model_name, names, args)
        results += rows
        print(f"\n### {model_name} ({rows[0]['params'] / 1e6:.3g}M parameters)\n")
        print(table(rows, args.device == "cuda"))
    if args.json is not None:
        meta = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads()}
        args.json.write_text(
            json.dumps({**meta, "steps": args.steps, "rounds": args.rounds, "rows": results}, indent=1)
        )


if __name__ == "__main__":
    main()
