"""Issue 13 items 1 and 2 through a real ``Trainer``: fine-tuning that adds a param group
(``BackboneFinetuning``) with ``ShampooCallback`` or ``configure_shampoo``, and resuming a plain
AdamW checkpoint with the callback added (and the reverse); single process and 2-rank DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_shampoo as ls
from lightning_shampoo._translate import translate_optimizer
from lightning_shampoo.callbacks import shampoo as shampoo_callback

SCRIPTS = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))

from finetune_common import (  # noqa: E402
    BATCH,
    BETAS,
    EPS,
    LR,
    SAMPLES,
    UNFREEZE_AT,
    WEIGHT_DECAY,
    Tuner,
    drop_in,
    finetuning,
    params,
    trainer,
)

STEPS_PER_EPOCH = SAMPLES // BATCH


def _shampoo(t: Any) -> ls.Shampoo:
    optimizer = t.optimizers[0]
    assert isinstance(optimizer, ls.Shampoo)
    return optimizer


# ------------------------------------------------------------------ item 1: fine-tuning


@pytest.mark.parametrize("named", [False, True])
def test_backbone_finetuning_with_the_drop_in_translates_the_new_group(tmp_path: Path, named: bool) -> None:
    module = Tuner(named=named, schedule=False)  # a LambdaLR does not survive an added group (torch)
    start = params(module)
    t = trainer(tmp_path, epochs=3, callbacks=[drop_in(), finetuning()])
    t.fit(module)
    opt = _shampoo(t)
    assert len(opt.param_groups) == 2
    head, backbone = opt.param_groups
    # the added group is set up like its sibling, from AdamW's values (not Shampoo's defaults)
    for key in ("betas", "weight_decay", "grafting_config", "precondition_frequency", "epsilon",
                "preconditioner_config", "skip_preconditioning_rank_lt", "use_decoupled_weight_decay",
                "max_preconditioner_dim"):  # fmt: skip
        assert backbone[key] == head[key], key
    assert backbone["betas"] == (BETAS[0], 0.95)
    assert backbone["grafting_config"] == ls.AdamPreconditionerConfig(beta2=BETAS[1], epsilon=EPS)
    assert backbone["weight_decay"] == WEIGHT_DECAY and backbone["skip_preconditioning_rank_lt"] == 2
    # BackboneFinetuning adds unnamed parameters to named groups: they are named from the module
    assert backbone["param_names"] == [
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.2.weight",
        "backbone.2.bias",
    ]
    assert head["param_names"] == ["head.weight", "head.bias"]
    # every backbone parameter trained (after the unfreeze) and every block stepped
    end = params(module)
    for name in start:
        assert not torch.equal(start[name], end[name]), name
        assert bool(torch.isfinite(end[name]).all())
    steps = {key: int(opt.block_state(key)["status.step"]) for key in opt.block_keys()}
    total = 3 * STEPS_PER_EPOCH
    head_ids = {0, 1}
    assert {s for (p, _), s in steps.items() if p in head_ids} == {total}
    assert {s for (p, _), s in steps.items() if p not in head_ids} == {total - UNFREEZE_AT * STEPS_PER_EPOCH}
    assert backbone["step"] == total - UNFREEZE_AT * STEPS_PER_EPOCH
    assert head["step"] == total


def test_adding_a_group_keeps_the_existing_blocks_state() -> None:
    """The plan is extended, not rebuilt from scratch: existing buckets keep their state tensors'
    values (and keys), the new group's blocks start from their initial values."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    opt = ls.configure_shampoo(model[2], lr=1e-2, precondition_frequency=1, start_preconditioning_step=1)
    assert isinstance(opt, ls.Shampoo)
    x = torch.randn(16, 5)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    before = {
        k: {s: {n: t.clone() for n, t in d.items()} for s, d in v.items()} for k, v in opt.state.items()
    }
    opt.add_param_group({"params": list(model[0].parameters())})
    model(x).pow(2).mean().backward()
    assert set(before) <= {b.key for b in opt.buckets}
    for key, sections in before.items():
        for section, tensors in sections.items():
            for name, value in tensors.items():
                assert torch.equal(opt.state[key][section][name], value), (key, section, name)
    opt.step()
    new = opt.param_groups[-1]
    assert new["preconditioner_config"] == opt.param_groups[0]["preconditioner_config"]
    assert new["skip_preconditioning_rank_lt"] == 2 and new["lr"] == 1e-2
    assert new["param_names"] == ["param2", "param3"]  # not parameters of the module given: by index


def test_backbone_finetuning_with_configure_shampoo(tmp_path: Path) -> None:
    module = Tuner(optimizer="configure_shampoo", schedule=False)
    start = params(module)
    t = trainer(tmp_path, epochs=2, callbacks=[finetuning()])
    t.fit(module)
    opt = _shampoo(t)
    added = opt.param_groups[-1]
    matrices = next(g for g in opt.param_groups if g.get("name") == "shampoo")
    for key in ("preconditioner_config", "grafting_config", "betas", "epsilon", "precondition_frequency"):
        assert added[key] == matrices[key], key
    assert (
        added["skip_preconditioning_rank_lt"] == 2
    )  # biases on the Adam grafting, as the preset's Adam group
    assert added["weight_decay"] == WEIGHT_DECAY
    assert added["lr"] == pytest.approx(LR * 0.5)  # BackboneFinetuning's backbone_initial_ratio_lr
    end = params(module)
    assert all(not torch.equal(start[n], end[n]) for n in start)


def test_finetuning_resumes_after_the_unfreeze(tmp_path: Path) -> None:
    """BackboneFinetuning puts its added group back on resume by assigning ``param_groups``;
    Shampoo follows (its plan gets the group again) and loads every block's state. Its callback
    state holds Shampoo's group options (config objects), which the package allows in
    ``weights_only=True`` loads (``_safe_globals``): torch's default loads it. (Lightning
    leaves the backbone's ``requires_grad`` off after such a resume, with AdamW as well, so the
    resumed run is not the uninterrupted one; what is checked is the restored optimizer.)"""
    half = Tuner(schedule=False)
    first = trainer(tmp_path / "a", epochs=2, callbacks=[drop_in(), finetuning()])
    first.fit(half)
    path = tmp_path / "half.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]

    restored: list[dict[str, Any]] = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            state = _shampoo(trainer).state_dict()  # views of the live state: copied
            state["state"] = {i: {k: v.clone() for k, v in e.items()} for i, e in state["state"].items()}
            restored.append(state)

    resumed = Tuner(schedule=False)
    second = trainer(tmp_path / "b", epochs=3, callbacks=[drop_in(), finetuning(), Probe()])
    second.fit(resumed, ckpt_path=path, weights_only=True)
    (state,) = restored
    assert len(state["param_groups"]) == 2
    assert state["param_groups"] == saved["param_groups"]
    assert state["state"].keys() == saved["state"].keys() and len(state["state"]) == 6
    for index, entries in saved["state"].items():
        assert state["state"][index].keys() == entries.keys()
        for key, value in entries.items():
            assert torch.equal(state["state"][index][key], value), (index, key)
    opt = _shampoo(second)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    assert opt.param_groups[1]["step"] > saved["param_groups"][1]["step"]  # it kept stepping
    assert all(bool(torch.isfinite(p).all()) for p in resumed.parameters())


# ------------------------------------------------------------------ item 2: resuming AdamW


def test_an_adamw_checkpoint_resumes_with_the_drop_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    monkeypatch.setattr(shampoo_callback, "rank_zero_info", said.append)
    plain = trainer(tmp_path / "plain", epochs=1)
    plain.fit(Tuner())
    path = tmp_path / "adamw.ckpt"
    plain.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["optimizer_states"][0]["state"]

    start = 4  # the drop-in's start_preconditioning_step: the resumed run is AdamW for 3 more steps
    steps = STEPS_PER_EPOCH + start - 1
    reference = Tuner()  # the same checkpoint resumed with plain AdamW for those steps
    trainer(tmp_path / "ref", steps=steps).fit(reference, ckpt_path=path)
    resumed = Tuner()
    callback = drop_in(start_preconditioning_step=start, precondition_frequency=2)
    t = trainer(tmp_path / "drop_in", steps=steps, callbacks=[callback])
    t.fit(resumed, ckpt_path=path)
    opt = _shampoo(t)
    assert t.global_step == steps
    assert opt.param_groups[0]["step"] == steps
    assert opt.param_groups[0]["start_preconditioning_step"] == STEPS_PER_EPOCH + start
    # the grafting state continued AdamW's moments: the same parameters as AdamW resumed (the
    # scheduler's learning rate included), to float32 rounding
    for name, value in params(reference).items():
        torch.testing.assert_close(params(resumed)[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert opt.param_groups[0]["lr"] == reference.trainer.optimizers[0].param_groups[0]["lr"]
    assert opt.resume_note is not None and "AdamW" in opt.resume_note
    assert "6/6 parameter(s)" in opt.resume_note and "start fresh" in opt.resume_note
    assert said.count(opt.resume_note) == 1

    # then preconditioning starts, from statistics of its own
    longer = Tuner()
    callback = drop_in(start_preconditioning_step=start, precondition_frequency=2)
    t2 = trainer(tmp_path / "longer", steps=STEPS_PER_EPOCH + start + 4, callbacks=[callback])
    t2.fit(longer, ckpt_path=path)
    records = _shampoo(t2).health()
    assert any(
        r.last_refresh_step is not None and r.last_refresh_step >= STEPS_PER_EPOCH + start for r in records
    )
    assert all(bool(torch.isfinite(p).all()) for p in longer.parameters())
    saved = tmp_path / "shampoo.ckpt"
    t2.save_checkpoint(saved)
    marker = torch.load(saved, weights_only=True)["optimizer_states"][0]["lightning_shampoo"]
    assert marker["origin"] == "ShampooCallback (from torch.optim.AdamW)"


def test_a_shampoo_checkpoint_without_the_callback_names_the_cause(tmp_path: Path) -> None:
    t = trainer(tmp_path / "a", epochs=1, callbacks=[drop_in()])
    t.fit(Tuner())
    path = tmp_path / "shampoo.ckpt"
    t.save_checkpoint(path)
    # into a plain AdamW: Lightning names the missing ShampooCallback, then torch's AdamW fails
    with pytest.warns(UserWarning, match="ShampooCallback"), pytest.raises(KeyError, match="step"):
        trainer(tmp_path / "b", epochs=2).fit(Tuner(), ckpt_path=path)
    # into a Shampoo built otherwise (configure_shampoo): our own message names both builders
    with pytest.raises(
        ValueError,
        match=r"built by ShampooCallback \(from torch.optim.AdamW\), this one by configure_shampoo",
    ):
        trainer(tmp_path / "c", epochs=2).fit(Tuner(optimizer="configure_shampoo"), ckpt_path=path)


# ------------------------------------------------------------------ 2-rank DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both items under plain ``"ddp"`` on 2 CPU ranks (``dist_scripts/finetune_resume_job.py``)."""
    from conftest import DIST_ENV

    out = tmp_path_factory.mktemp("finetune_resume_job")
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SCRIPTS), str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "finetune_resume_job.py"), str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def _ranks(job: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(job / f"{name}.rank{r}.pt", weights_only=True) for r in range(2)]


def _same_on_both_ranks(summaries: list[dict[str, Any]]) -> None:
    for name, value in summaries[0]["params"].items():
        assert torch.equal(summaries[1]["params"][name], value), name


def test_finetuning_under_two_rank_ddp(ddp_job: Path) -> None:
    runs = _ranks(ddp_job, "finetune")
    _same_on_both_ranks(runs)
    for rank in runs:
        assert rank["sharded"]
        head, backbone = rank["groups"]
        assert backbone["params"] == 4 and head["params"] == 2
        assert backbone["betas"] == [BETAS[0], 0.95] and backbone["graft_beta2"] == BETAS[1]
        assert backbone["weight_decay"] == WEIGHT_DECAY and backbone["skip"] == 2
        assert backbone["step"] == 2 * 4 and head["step"] == 3 * 4  # 4 steps per epoch per rank
    held = [set(map(tuple, r["held"])) for r in runs]
    blocks = set(map(tuple, runs[0]["blocks"]))
    assert held[0] | held[1] == blocks and not held[0] & held[1]  # every block, once, new ones too
    assert any(p >= 2 for p, _ in held[0] | held[1])
    # resumed after the unfreeze: BackboneFinetuning's groups come back, Shampoo follows (sharded)
    resumed = _ranks(ddp_job, "finetune_resumed")
    _same_on_both_ranks(resumed)
    assert resumed[0]["sharded"] and [g["params"] for g in resumed[0]["groups"]] == [2, 4]
    assert resumed[0]["groups"][0]["step"] == 4 * 4 and resumed[0]["global_step"] == 4 * 4
    assert resumed[0]["blocks"] == runs[0]["blocks"]
    # configure_shampoo under plain "ddp" is not sharded: the backbone, frozen when DDP wrapped the
    # model, gets no gradient averaging after the unfreeze (torch DDP's rule, the same with AdamW),
    # so the ranks' backbones differ; the added group is set up like the preset's matrices
    configured = _ranks(ddp_job, "finetune_configure")
    assert all(bool(torch.isfinite(p).all()) for r in configured for p in r["params"].values())
    assert configured[0]["groups"][-1]["kind"] == "RootInvShampooPreconditionerConfig"
    assert configured[0]["groups"][-1]["skip"] == 2


def test_an_adamw_checkpoint_resumes_under_two_rank_ddp(ddp_job: Path) -> None:
    reference, resumed, longer = (_ranks(ddp_job, n) for n in ("reference", "resumed", "longer"))
    for runs in (reference, resumed, longer):
        _same_on_both_ranks(runs)
    assert resumed[0]["global_step"] == reference[0]["global_step"] == 4 + 3
    for name, value in reference[0]["params"].items():
        torch.testing.assert_close(resumed[0]["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed[0]["sharded"] and "torch.optim.AdamW" in resumed[0]["note"]
    assert resumed[0]["groups"][0]["start"] == 4 + 4
    assert all(bool(torch.isfinite(p).all()) for p in longer[0]["params"].values())
    assert longer[0]["global_step"] == 4 + 3 + 4


def test_a_group_added_in_the_wrapped_optimizers_terms_or_in_shampoos() -> None:
    """Under the drop-in a group may be written as for the wrapped AdamW (its betas and eps mean
    AdamW's) or in Shampoo's keys (taken as given); what it leaves out comes from the translation
    of AdamW's defaults."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3))
    adamw = torch.optim.AdamW(model[0].parameters(), lr=1e-3, betas=BETAS, eps=EPS, weight_decay=0.1)
    shampoo = translate_optimizer(
        adamw, drop_in().options, {id(p): n for n, p in model.named_parameters()}, 0.95
    )
    shampoo.add_param_group({"params": list(model[1].parameters()), "betas": (0.5, 0.9), "eps": 1e-6})
    theirs = shampoo.param_groups[-1]
    assert theirs["betas"] == (0.5, 0.95)
    assert theirs["grafting_config"] == ls.AdamPreconditionerConfig(beta2=0.9, epsilon=1e-6)
    assert theirs["lr"] == 1e-3 and theirs["weight_decay"] == 0.1 and theirs["use_decoupled_weight_decay"]
    assert theirs["param_names"] == ["1.weight", "1.bias"]
    shampoo.add_param_group({"params": list(model[2].parameters()), "epsilon": 1e-6, "momentum": 0.5})
    ours = shampoo.param_groups[-1]
    assert ours["epsilon"] == 1e-6 and ours["momentum"] == 0.5
    assert ours["betas"] == (BETAS[0], 0.95)
    assert ours["grafting_config"] == ls.AdamPreconditionerConfig(beta2=BETAS[1], epsilon=EPS)
    refused = r"amsgrad=True has no Shampoo equivalent.*wrapped torch\.optim\.AdamW"
    with pytest.raises(ValueError, match=refused):
        shampoo.add_param_group({"params": [nn.Parameter(torch.ones(3, 3))], "amsgrad": True})


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.95, momentum=0.5),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    ],
    ids=["AdamW", "Adam", "SGD", "RMSprop", "Adagrad"],
)
def test_a_torch_optimizers_state_continues_block_by_block(make: Any) -> None:
    """Every ``torch.optim`` source: its state cut into Shampoo's blocks (here several per
    parameter, merged and split dims) continues it exactly until the moved start."""
    torch.manual_seed(0)
    shapes = [(6, 3, 2, 2), (9, 5), (7,), (1, 6)]
    start = [nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(8)]
    source_params = [nn.Parameter(p.detach().clone()) for p in start]
    source = make(source_params[:2])  # two groups: the first two parameters, then the others
    source.add_param_group({"params": source_params[2:]})
    for step in range(5):
        for p, g in zip(source_params, grads[step]):
            p.grad = g.clone()
        source.step()
    saved = source.state_dict()
    mirror = [nn.Parameter(p.detach().clone()) for p in source_params]
    clone = make(mirror[:2])
    clone.add_param_group({"params": mirror[2:]})
    shampoo = translate_optimizer(
        clone, {**drop_in().options, "max_preconditioner_dim": 4, "start_preconditioning_step": 3}, None, 0.95
    )
    shampoo.load_state_dict(saved)
    assert shampoo.resume_note is not None and "4/4 parameter(s)" in shampoo.resume_note
    assert all(g["start_preconditioning_step"] in (3, 5 + 3) for g in shampoo.param_groups)
    for step in range(5, 7):  # grafting alone until the moved start: the source's own update
        for p, q, g in zip(source_params, mirror, grads[step]):
            p.grad, q.grad = g.clone(), g.clone()
        source.step()
        shampoo.step()
    for p, q in zip(source_params, mirror):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert any(len(shampoo.plan.layout(i).regions) > 1 for i in range(2))  # blocks really split


def test_a_torch_state_with_other_groups_is_refused_by_name() -> None:
    a, b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))
    source = torch.optim.AdamW([a, b])
    a.grad, b.grad = torch.ones(3, 3), torch.ones(3)
    source.step()
    shampoo = translate_optimizer(torch.optim.AdamW([{"params": [a]}, {"params": [b]}]), drop_in().options)
    with pytest.raises(
        ValueError, match=r"torch.optim.AdamW's with parameters per group \[2\]; this Shampoo has \[1, 1\]"
    ):
        shampoo.load_state_dict(source.state_dict())
