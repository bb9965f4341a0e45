"""A multi-process Lightning job for ``tests/test_distributed.py``: runs the fits listed in a
JSON spec one after another (the processes and their group are reused) and writes each rank's
summary. Lightning's default launcher re-runs this script for the other ranks.

Spec: ``{"devices": 2, "runs": [{"name", "strategy", "preconditioner", "epochs", "steps",
"communication_dtype", "epsilon", "full_checkpoint", "save", "resume", "callback", "averaging"}, ...],
"out": DIR}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from dist_common import Net, callback, save_summary, trainer

from lightning_shampoo import IterateAveragingSwitch, ShampooDDPStrategy, ShampooFSDPStrategy


def strategy(run: dict[str, Any]) -> Any:
    name, options = run["strategy"], {}
    if "communication_dtype" in run:
        options["communication_dtype"] = getattr(torch, run["communication_dtype"])
    if run.get("full_checkpoint"):
        options["save_distributed_checkpoint"] = False
    if not options:
        return name  # by its registry name
    cls = {"shampoo_ddp": ShampooDDPStrategy, "shampoo_fsdp": ShampooFSDPStrategy}[name]
    return cls(**options)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for run in spec["runs"]:
        module = Net(
            run.get("preconditioner", "shampoo"),
            adamw=bool(run.get("callback")),
            epsilon=run.get("epsilon", 1e-10),
            averaging=bool(run.get("averaging")),
        )
        callbacks = [callback()] if run.get("callback") else []
        if run.get("averaging"):
            callbacks.append(IterateAveragingSwitch())
        t = trainer(
            strategy(run),
            devices=spec["devices"],
            epochs=run.get("epochs", 2),
            steps=run.get("steps", -1),
            callbacks=callbacks or None,
        )
        t.fit(module, ckpt_path=run.get("resume"))
        if run.get("save"):
            t.save_checkpoint(run["save"])
        save_summary(out / run["name"], module, t.optimizers[0], t.global_rank)


if __name__ == "__main__":
    main(sys.argv[1])
