"""``configure_shampoo``: param groups, presets, overrides, LR schedules, argument errors."""

from __future__ import annotations

import math
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo import (
    AdamPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    KLShampooPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
    SpectralDescentPreconditionerConfig,
    configure_shampoo,
)
from lightning_shampoo.configure import PRESET_NAMES
from lightning_shampoo.schedules import WarmupCosine, WarmupLinear

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*log_every_n_steps")


class Net(pl.LightningModule):
    """Every kind of parameter: embedding, conv kernel (and a 1x1 one), hidden matrices, norm,
    biases, a row vector [1, d], a scalar, a frozen matrix and a head tied to the embedding."""

    def __init__(self, **options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 4, kernel_size=3, padding=1)
        self.mix = nn.Conv1d(4, 6, kernel_size=1, bias=False)
        self.hidden = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.row = nn.Parameter(0.1 * torch.randn(1, 6))
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Parameter(torch.randn(6, 6), requires_grad=False)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.options = options
        self.lrs: list[list[float]] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)  # [b, 6, t]
        h = self.mix(torch.relu(self.conv(h))).transpose(1, 2)  # [b, t, 6]
        h = self.norm(torch.tanh(self.hidden(h) + self.row) @ self.frozen) * self.scale
        return self.head(h)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, target = batch
        self.lrs.append([g["lr"] for g in self.trainer.optimizers[0].param_groups])
        return nn.functional.cross_entropy(self(tokens).flatten(0, 1), target.flatten())

    def configure_optimizers(self):
        return configure_shampoo(self, **self.options)


MATRICES = ["embed.weight", "conv.weight", "mix.weight", "hidden.weight"]
VECTORS = ["row", "scale", "conv.bias", "hidden.bias", "norm.weight", "norm.bias"]


def fit(model: pl.LightningModule, steps: int = 3) -> pl.Trainer:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randint(0, 10, (32, 5), generator=g), torch.randint(0, 10, (32, 5), generator=g)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return trainer


def groups_by_name(optimizer: Shampoo) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_default_groups() -> None:
    model = Net()
    optimizer = configure_shampoo(model, lr=3e-3, weight_decay=0.1)
    assert isinstance(optimizer, Shampoo)
    groups = groups_by_name(optimizer)
    assert set(groups) == {"shampoo", "adam_no_decay"}
    matrix, diagonal = groups["shampoo"], groups["adam_no_decay"]
    # frozen skipped, tied head once (under the embedding's name), 1x1 conv kernel is a matrix
    assert matrix["param_names"] == MATRICES
    assert sorted(diagonal["param_names"]) == sorted(VECTORS)
    assert [id(p) for g in optimizer.param_groups for p in g["params"]].count(id(model.embed.weight)) == 1
    assert matrix["weight_decay"] == 0.1 and diagonal["weight_decay"] == 0.0
    assert matrix["lr"] == diagonal["lr"] == 3e-3
    assert isinstance(matrix["preconditioner_config"], RootInvShampooPreconditionerConfig)
    assert matrix["grafting_config"] == AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
    assert matrix["betas"] == (0.9, 0.95) and matrix["epsilon"] == 1e-12  # factor EMA β 0.95
    assert matrix["precondition_frequency"] == 10 and matrix["max_preconditioner_dim"] == 256
    assert diagonal["preconditioner_config"] == AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
    assert diagonal["grafting_config"] is None and diagonal["betas"] == (0.9, 0.999)
    assert matrix["use_decoupled_weight_decay"] is True
    # names reach the health records
    assert {h.param_name for h in optimizer.health()} <= set(MATRICES + VECTORS)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_trains_under_lightning(name: str) -> None:
    model = Net(preconditioner=name, lr=1e-2, weight_decay=0.01, precondition_frequency=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = fit(model, steps=3)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, Shampoo)
    assert all(g["step"] == 3 for g in optimizer.param_groups)
    if name in ("shampoo", "eigen", "kl_shampoo", "soap"):  # preconditioning started at step 2
        # Every block refreshed at step 2; the presets stagger refreshes (refresh_stagger), so
        # the blocks of phase 1 refreshed again at step 3.
        records = [h for h in optimizer.health() if h.param_name in MATRICES]
        assert {h.param_name for h in records} == set(MATRICES)
        for h in records:
            phase = optimizer.refresh_phases(h.group)[h.key]
            assert h.last_refresh_step == (3 if phase == 1 else 2), h.param_name
            assert h.refreshes == (2 if phase == 1 else 1), h.param_name
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        moved = not torch.equal(p, before[n])
        assert moved == p.requires_grad, n


def test_preset_specifics() -> None:
    soap = groups_by_name(configure_shampoo(Net(), "soap"))
    assert isinstance(soap["soap"]["preconditioner_config"], EigenvalueCorrectedShampooPreconditionerConfig)
    assert soap["soap"]["betas"] == (0.95, 0.95) and soap["soap"]["grafting_config"] is None
    assert soap["adam_no_decay"]["betas"] == (0.95, 0.95)
    assert soap["adam_no_decay"]["preconditioner_config"].beta2 == 0.95
    assert soap["soap"]["use_merge_dims"] is False  # as the reference SOAP: kernels keep their dims
    merged = groups_by_name(configure_shampoo(Net(), "soap", use_merge_dims=True))
    assert merged["soap"]["use_merge_dims"] is True  # the caller's word wins
    eigen = groups_by_name(configure_shampoo(Net(), "eigen"))
    assert isinstance(eigen["eigen"]["preconditioner_config"], EigendecomposedShampooPreconditionerConfig)
    kl = groups_by_name(configure_shampoo(Net(), "kl_shampoo"))
    assert isinstance(kl["kl_shampoo"]["preconditioner_config"], KLShampooPreconditionerConfig)
    adam = groups_by_name(configure_shampoo(Net(), "adam", weight_decay=0.1))
    # The Adam side's epsilon (adam_epsilon, 1e-8), not the class default (1e-10, as Distributed Shampoo).
    assert adam["adam"]["preconditioner_config"] == AdamPreconditionerConfig(epsilon=1e-8)
    assert adam["adam"]["weight_decay"] == 0.1 and adam["adam_no_decay"]["weight_decay"] == 0.0


def test_muon_keeps_embeddings_and_head_on_adam() -> None:
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(12, 8)
            self.conv = nn.Conv2d(2, 4, 3)
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
            self.out = nn.Linear(8, 3)  # the last Linear: the head

    optimizer = configure_shampoo(Mlp(), "muon", weight_decay=0.1)
    groups = groups_by_name(optimizer)
    muon, adam = groups["muon"], groups["adam"]
    assert muon["param_names"] == ["conv.weight", "body.0.weight", "body.2.weight"]
    assert isinstance(muon["preconditioner_config"], SpectralDescentPreconditionerConfig)
    assert muon["preconditioner_config"].scale == "rms" and muon["max_preconditioner_dim"] == math.inf
    assert muon["betas"][0] == 0.95 and muon["weight_decay"] == 0.1
    assert adam["param_names"] == ["embed.weight", "out.weight"] and adam["weight_decay"] == 0.1
    assert adam["betas"] == (0.9, 0.95)
    assert sorted(groups["adam_no_decay"]["param_names"]) == [
        "body.0.bias",
        "body.2.bias",
        "conv.bias",
        "out.bias",
    ]
    # the conv kernel [4, 2, 3, 3] is one 2-D block, as spectral descent needs
    conv = [plan.block_shape for plan in optimizer.buckets if plan.members[0].param.name == "conv.weight"]
    assert conv == [(4, 18)]
    # a head registered under a usual name wins over the last Linear
    named = nn.ModuleDict({"head": nn.Linear(4, 4), "proj": nn.Linear(4, 4)})
    assert groups_by_name(configure_shampoo(named, "muon"))["adam"]["param_names"] == ["head.weight"]


def test_overrides_by_pattern() -> None:
    optimizer = configure_shampoo(
        Net(),
        lr=1e-3,
        weight_decay=0.1,
        param_groups={
            "embed.*": {"preconditioner": "adam", "lr": 5e-4},
            "re:(conv|mix)\\.weight": {"weight_decay": 0.0, "precondition_frequency": 3},
            "norm.*": {"lr": 1e-2},
        },
    )
    groups = groups_by_name(optimizer)
    embed = groups["embed.* (shampoo)"]
    assert embed["param_names"] == ["embed.weight"] and embed["lr"] == 5e-4
    assert embed["preconditioner_config"] == AdamPreconditionerConfig(epsilon=1e-8)
    assert embed["grafting_config"] is None
    assert embed["weight_decay"] == 0.1  # a matrix keeps its decay on Adam
    convs = groups["re:(conv|mix)\\.weight (shampoo)"]
    assert convs["param_names"] == ["conv.weight", "mix.weight"]
    assert convs["weight_decay"] == 0.0 and convs["precondition_frequency"] == 3
    assert isinstance(convs["preconditioner_config"], RootInvShampooPreconditionerConfig)
    norm = groups["norm.* (adam_no_decay)"]
    assert norm["param_names"] == ["norm.weight", "norm.bias"] and norm["lr"] == 1e-2
    assert groups["shampoo"]["param_names"] == ["hidden.weight"]
    # a bias may be given a Kronecker preconditioner explicitly
    soap = configure_shampoo(Net(), param_groups={"hidden.bias": {"preconditioner": "soap"}})
    bias = groups_by_name(soap)["hidden.bias (adam_no_decay)"]
    assert isinstance(bias["preconditioner_config"], EigenvalueCorrectedShampooPreconditionerConfig)
    # a pattern shadowed by an earlier one is not an error; one that matches nothing is
    shadowed = configure_shampoo(Net(), param_groups={"*.bias": {"lr": 1.0}, "hidden.*": {"lr": 2.0}})
    lrs = {n: g["lr"] for g in shadowed.param_groups for n in g["param_names"]}
    assert (lrs["hidden.bias"], lrs["hidden.weight"], lrs["conv.weight"]) == (1.0, 2.0, 1e-3)
    with pytest.raises(ValueError, match=r"param_groups pattern 'decoder\.\*' matches no"):
        configure_shampoo(Net(), param_groups={"decoder.*": {"lr": 1.0}})
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        configure_shampoo(Net(), param_groups={"embed.*": {"learning_rate": 1.0}})
    with pytest.raises(ValueError, match="not a valid regex"):
        configure_shampoo(Net(), param_groups={"re:(": {"lr": 1.0}})


def test_config_object_and_kwargs() -> None:
    config = EigenvalueCorrectedShampooPreconditionerConfig(ignored_basis_change_dims={2: [1]})
    optimizer = configure_shampoo(
        Net(), config, betas=(0.9, 0.99), momentum=0.5, use_bucketing=False, precondition_frequency=4
    )
    groups = groups_by_name(optimizer)
    main = groups[next(n for n in groups if n != "adam_no_decay")]
    assert main["preconditioner_config"] is config and main["betas"] == (0.9, 0.99)
    assert main["precondition_frequency"] == 4 and main["start_preconditioning_step"] == 4
    assert groups["adam_no_decay"]["betas"] == (0.9, 0.95)  # β₁ follows, the preset's Adam β₂
    assert all(g["momentum"] == 0.5 for g in optimizer.param_groups)
    assert optimizer._use_bucketing is False


@pytest.mark.parametrize(("schedule", "multiplier"), [("cosine", WarmupCosine), ("linear", WarmupLinear)])
def test_lr_schedule_uses_estimated_stepping_batches(schedule: str, multiplier: type) -> None:
    model = Net(lr=1e-2, schedule=schedule, warmup_steps=2, min_lr_ratio=0.1)
    trainer = fit(model, steps=6)
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(config["optimizer"], Shampoo)
    assert trainer.estimated_stepping_batches == 6
    expected = [1e-2 * multiplier(total_steps=6, warmup_steps=2, min_ratio=0.1)(s) for s in range(6)]
    assert [lrs[0] for lrs in model.lrs] == pytest.approx(expected)
    assert all(len(set(lrs)) == 1 for lrs in model.lrs)  # every group follows the schedule
    assert model.lrs[0][0] == pytest.approx(5e-3) and model.lrs[-1][0] < model.lrs[2][0]


def test_schedule_without_trainer_needs_total_steps() -> None:
    with pytest.raises(ValueError, match="total_steps is required"):
        configure_shampoo(nn.Linear(3, 3), schedule="cosine")
    out = configure_shampoo(nn.Linear(3, 3), warmup_steps=0.25, total_steps=8)
    assert isinstance(out, dict)
    scheduler = out["lr_scheduler"]["scheduler"]
    assert scheduler.lr_lambdas[0].warmup_steps == 2 and scheduler.lr_lambdas[0](7) == 1.0  # "constant"
    # the multiplier's state is plain numbers, so the scheduler's state_dict loads with weights_only
    assert scheduler.state_dict()["lr_lambdas"][0] == {"total_steps": 8, "warmup_steps": 2, "min_ratio": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"preconditioner": "shampo"}, "preconditioner"),
        ({"preconditioner": 3}, "preconditioner"),
        ({"schedule": "cosine_restarts", "total_steps": 5}, "schedule"),
        ({"schedule": "cosine", "total_steps": 0}, "total_steps"),
        ({"schedule": "cosine", "total_steps": 5, "warmup_steps": -1}, "warmup_steps"),
        ({"schedule": "cosine", "total_steps": 5, "warmup_steps": 1.5}, "warmup_steps"),
        ({"schedule": "cosine", "total_steps": 5, "min_lr_ratio": 2.0}, "min_lr_ratio"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"adam_betas": (0.9,)}, "adam_betas"),
        ({"adam_epsilon": 0.0}, "adam_epsilon"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"precondition_frequency": 0}, "precondition_frequency"),
        ({"max_preconditioner_dim": 0}, "max_preconditioner_dim"),
        ({"momentum": 1.5}, "momentum"),
        ({"learning_rate": 1e-3}, "learning_rate"),
        ({"preconditioner_config": AdamPreconditionerConfig()}, "preconditioner_config"),
        ({"param_groups": ["embed.*"]}, "param_groups"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        configure_shampoo(Net(), **kwargs)


def test_no_trainable_parameters() -> None:
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        configure_shampoo(frozen)


def test_psgd_kron_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning_shampoo.preconditioners.psgd_kron", None)
    with pytest.raises(ImportError, match="psgd_kron"):
        configure_shampoo(Net(), "psgd_kron")
