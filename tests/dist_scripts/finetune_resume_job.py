"""The 2-rank Lightning job of ``tests/test_finetune_and_resume.py`` (plain ``"ddp"``; the drop-in
shards the blocks): fine-tuning that adds a param group, and an AdamW checkpoint resumed with
``ShampooCallback``. Lightning's launcher re-runs this script for rank 1; each rank writes a
summary per run to ``OUT/{run}.rank{r}.pt``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from finetune_common import Tuner, drop_in, finetuning, params, trainer

import lightning_shampoo as ls

STEPS_PER_EPOCH = 4  # 64 samples, 8 per rank and step
START = 4


def summary(module: Any, t: Any) -> dict[str, Any]:
    optimizer = t.optimizers[0]
    out: dict[str, Any] = {"params": params(module), "global_step": t.global_step}
    if isinstance(optimizer, ls.Shampoo):
        held = optimizer.state_dict()["state"]
        out.update(
            sharded=optimizer.sharded,
            note=optimizer.resume_note or "",
            held=sorted({(p, int(k.split(".", 1)[0][6:])) for p, e in held.items() for k in e}),
            blocks=optimizer.block_keys(),
            groups=[
                {
                    "lr": float(g["lr"]),
                    "betas": list(g["betas"]),
                    "weight_decay": g["weight_decay"],
                    "skip": g["skip_preconditioning_rank_lt"],
                    "graft_beta2": getattr(g["grafting_config"], "beta2", None),
                    "kind": type(g["preconditioner_config"]).__name__,
                    "step": g.get("step", 0),
                    "start": g["start_preconditioning_step"],
                    "params": len(g["params"]),
                }
                for g in optimizer.param_groups
            ],
        )
    return out


def main(out: Path) -> None:
    runs: list[tuple[str, Any, Any]] = []

    def run(name: str, module: Any, t: Any, ckpt: Path | None = None, save: Path | None = None) -> None:
        t.fit(module, ckpt_path=ckpt)
        if save is not None:
            t.save_checkpoint(save)
        torch.save(summary(module, t), out / f"{name}.rank{t.global_rank}.pt")
        runs.append((name, module, t))

    tuned = out / "finetune.ckpt"
    callbacks = [drop_in(), finetuning()]
    run("finetune", Tuner(schedule=False), trainer(out, epochs=3, devices=2, callbacks=callbacks), save=tuned)
    callbacks = [drop_in(), finetuning()]
    t = trainer(out, epochs=4, devices=2, callbacks=callbacks)
    run("finetune_resumed", Tuner(schedule=False), t, ckpt=tuned)
    run(
        "finetune_configure",
        Tuner("configure_shampoo", schedule=False),
        trainer(out, epochs=2, devices=2, callbacks=[finetuning()]),
    )
    adamw = out / "adamw.ckpt"
    run("adamw", Tuner(), trainer(out, epochs=1, devices=2), save=adamw)
    steps = STEPS_PER_EPOCH + START - 1  # AdamW's update exactly until the shifted start
    run("reference", Tuner(), trainer(out, steps=steps, devices=2), ckpt=adamw)
    callback = drop_in(start_preconditioning_step=START, precondition_frequency=2)
    run("resumed", Tuner(), trainer(out, steps=steps, devices=2, callbacks=[callback]), ckpt=adamw)
    callback = drop_in(start_preconditioning_step=START, precondition_frequency=2)
    run("longer", Tuner(), trainer(out, steps=steps + 4, devices=2, callbacks=[callback]), ckpt=adamw)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
