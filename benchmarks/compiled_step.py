"""Plain step eager vs ``torch.compile``d (``shampoo_pt2_compile_config``), against ``AdamW(foreach=True)``.

The models, the weight decay and the warm-up are ``step_ops.py``'s: each optimizer takes
``WARMUP`` steps at its own settings (its first refresh included), then every group's
``precondition_frequency`` is set to 10⁹ so every measured step is a plain step. A compiled
optimizer's first plain step after that is eager (it fills the lane caches the graph reads); the
next one compiles ("compile s": the steps that compiled, in total — tracing plus code generation,
paid once per phase and lane); then ``--rounds`` rounds of ``--steps`` steps of every optimizer
back to back, AdamW first.
"time ×AdamW" is the median over rounds of the ratio to AdamW's time in the same round.
"top-level ops" counts as ``step_ops.py`` does (with ``inductor`` on the CPU the generated C++
kernels dispatch no aten ops; only extern kernels such as the matmuls remain). "graphs": graphs
the backend compiled for this optimizer (phases × lanes; more would mean a recompilation).

On a CPU the compiled step need not be faster: its purpose is the GPU, where a plain step is
bound by kernel launches (see ``docs/benchmarks.md``).

    OMP_NUM_THREADS=1 python benchmarks/compiled_step.py --models mlp --optimizers shampoo
    python benchmarks/compiled_step.py --device cuda --models transformer --mode reduce-overhead
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_ops import MODELS, WARMUP, _decay_groups_adamw, count_aten_ops, interleaved_times
from step_profile import _profile, plain_steps_only
from step_time import _sync

from lightning_shampoo import Shampoo, ShampooCallback, ShampooPT2CompileConfig, configure_shampoo

OPTIMIZERS = ("callback", "shampoo", "soap", "eigen")


def build(name: str, module: torch.nn.Module, decay: float, config: Any) -> torch.optim.Optimizer:
    """``step_ops.make_optimizer``'s optimizer ``name`` with ``shampoo_pt2_compile_config=config``."""
    if name == "adamw":
        return torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=decay, foreach=True)
    if name == "callback":
        callback = ShampooCallback(shampoo_pt2_compile_config=config)
        return callback.translate(_decay_groups_adamw(module, decay), module)
    result = configure_shampoo(module, name, weight_decay=decay, shampoo_pt2_compile_config=config)
    assert isinstance(result, torch.optim.Optimizer)
    return result


def measure(model_name: str, names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, loss = MODELS[model_name](device)
    loss.backward()
    optimizers: dict[str, torch.optim.Optimizer] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in ["adamw", *names]:
        for compiled in (False, True) if name != "adamw" else (False,):
            counter = CompileCounterWithBackend(args.backend) if compiled else None
            config = ShampooPT2CompileConfig(backend=counter, mode=args.mode) if counter else None
            optimizer = build(name, model, args.weight_decay, config)
            compiling = 0.0  # seconds of the steps during which the backend got a new graph
            for i in range(WARMUP + 3):
                if i == WARMUP:
                    plain_steps_only(optimizer)
                graphs = counter.frame_count if counter else 0
                _sync(device)
                began = time.perf_counter()
                optimizer.step()  # compiled: each phase's first plain step is eager, the next compiles
                _sync(device)
                if counter and counter.frame_count > graphs:
                    compiling += time.perf_counter() - began
            label = f"{name} compiled" if compiled else name
            row: dict[str, Any] = {"model": model_name, "optimizer": label}
            row["compile_s"] = compiling if compiled else None
            prof = _profile(optimizer, args.steps, device)
            row["top_ops"] = count_aten_ops(prof.events(), args.steps)[0]
            row["graphs"] = counter.frame_count if counter else None
            if isinstance(optimizer, Shampoo) and compiled:
                assert optimizer.compiled_steps > 0, "no plain step ran compiled"
            optimizers[label], rows[label] = optimizer, row
    times = interleaved_times(optimizers, args.steps, args.rounds, device)
    for label, row in rows.items():
        row["ms"] = 1e3 * statistics.median(times[label])
        row["time_ratio"] = statistics.median(t / a for t, a in zip(times[label], times["adamw"]))
        if rows[label]["graphs"] is not None:
            # Recompilations during the timed steps would show here as extra graphs.
            counter = optimizers[label].compile_config.backend  # type: ignore[attr-defined]
            row["graphs"] = counter.frame_count
    return list(rows.values())


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| optimizer | top-level aten ops | ms/step | time ×AdamW | compile s | graphs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        graphs = "" if r["graphs"] is None else str(r["graphs"])
        lines.append(
            f"| {r['optimizer']} | {r['top_ops']:.0f} | {r['ms']:.2f} | {r['time_ratio']:.1f}× "
            f"| {compile_s} | {graphs} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="mlp", help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--optimizers", default="shampoo", help=f"comma-separated, of {list(OPTIMIZERS)}")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead on CUDA)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--weight-decay", type=float, default=0.01)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [m for m in models if m not in MODELS] + [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"unknown {unknown}; models {list(MODELS)}, optimizers {list(OPTIMIZERS)}")
    print(
        f"Plain step, eager vs compiled ({args.backend}, mode {args.mode}): torch {torch.__version__}, "
        f"device {args.device}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds"
    )
    for model_name in models:
        rows = measure(model_name, names, args)
        print(f"\n### {model_name}\n")
        print(table(rows))


if __name__ == "__main__":
    main()
