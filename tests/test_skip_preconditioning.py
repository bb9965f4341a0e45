"""``skip_preconditioning_rank_lt``: parameters of lower rank are stepped by the grafting config
alone — exactly what a separate param group with that config as its preconditioner does."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import make_batches, small_model, train
from torch import nn

from lightning_shampoo import AdamPreconditionerConfig, RootInvShampooPreconditionerConfig, Shampoo
from lightning_shampoo.distributed import plan_ownership

GRAFT = AdamPreconditionerConfig(beta2=0.99, epsilon=1e-8)
COMMON = dict(
    lr=1e-2,
    betas=(0.9, 0.95),
    epsilon=1e-8,
    weight_decay=0.01,
    precondition_frequency=3,
    preconditioner_config=RootInvShampooPreconditionerConfig(),
)


def _skipping(model: nn.Module, rank_lt: int = 2) -> Shampoo:
    return Shampoo(
        list(model.named_parameters()), grafting_config=GRAFT, skip_preconditioning_rank_lt=rank_lt, **COMMON
    )


def _two_groups(model: nn.Module) -> Shampoo:
    """The same update by hand: matrices grafted, vectors on the graft's Adam as preconditioner."""
    params = list(model.parameters())
    return Shampoo(
        [
            {"params": [p for p in params if sum(d > 1 for d in p.shape) >= 2]},
            {
                "params": [p for p in params if sum(d > 1 for d in p.shape) < 2],
                "preconditioner_config": GRAFT,
                "grafting_config": None,
            },
        ],
        grafting_config=GRAFT,
        **COMMON,
    )


def test_skipped_parameters_take_the_grafting_update() -> None:
    ours, reference = small_model(), small_model()
    batches = make_batches(9)
    opt = _skipping(ours)
    train(ours, opt, batches)
    train(reference, _two_groups(reference), batches)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    kinds = {(h.param_name, h.preconditioner) for h in opt.health()}
    assert ("fc1.bias", "adam") in kinds and ("fc1.weight", "adam") not in kinds
    # ...and it is not the default: without skipping, the biases get Kronecker factors.
    plain = small_model()
    train(plain, _skipping(plain, rank_lt=0), batches)
    assert not torch.allclose(plain.fc1.bias, ours.fc1.bias)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_bad_values_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="skip_preconditioning_rank_lt"):
        Shampoo(small_model().parameters(), grafting_config=GRAFT, skip_preconditioning_rank_lt=value)


def test_needs_a_grafting_config() -> None:
    with pytest.raises(ValueError, match="skip_preconditioning_rank_lt > 0 needs a grafting_config"):
        Shampoo(small_model().parameters(), skip_preconditioning_rank_lt=2)


def test_checkpoint_refuses_a_different_setting() -> None:
    model = small_model()
    opt = _skipping(model)
    train(model, opt, make_batches(2))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    with pytest.raises(ValueError, match="skip_preconditioning_rank_lt"):
        _skipping(model, rank_lt=0).load_state_dict(saved)
    _skipping(model).load_state_dict(saved)  # the same setting loads
    # A checkpoint from before the option existed implies 0: refused, not misread.
    for group in saved["param_groups"]:
        del group["skip_preconditioning_rank_lt"]
    with pytest.raises(ValueError, match="skip_preconditioning_rank_lt=0"):
        _skipping(model).load_state_dict(saved)


def test_planner_costs_skipped_blocks_as_diagonal() -> None:
    """A skipped bias costs what a diagonal block costs, not a d x d factor's refresh."""
    model = nn.Linear(64, 256)
    skipped = plan_ownership(_skipping(model), 2).costs
    full = plan_ownership(_skipping(model, rank_lt=0), 2).costs
    bias = (1, 0)  # param 1 (the bias), block 0
    assert skipped[bias] < full[bias] / 100
    assert skipped[(0, 0)] == full[(0, 0)]
