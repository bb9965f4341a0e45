"""Iterate averaging wired into ``Shampoo`` (GPA, Schedule-Free) and its train ↔ eval switching.

* on a quadratic, the optimizer's parameters follow the pure updates of ``averaging.py`` (closed
  form) for GPA and for Schedule-Free with a warm-up learning rate;
* Schedule-Free with a diagonal Adam preconditioner is schedule-free AdamW, written out here;
* ``eval()`` gives the averaged ``x`` and ``train()`` restores ``y`` bitwise; resuming from a
  checkpoint (saved in either mode) continues bitwise;
* skipped blocks keep ``y``, ``z`` and Schedule-Free's sum.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from lightning_shampoo import (
    AdamPreconditionerConfig,
    GeneralizedPrimalAveragingConfig,
    ScheduleFreeConfig,
    SGDPreconditionerConfig,
    Shampoo,
)
from lightning_shampoo.averaging import averaging_step_, schedule_free_eval_coefficient, train_to_eval_

F64 = torch.float64
LRS = [0.02, 0.05, 0.1, 0.1, 0.1, 0.08, 0.05, 0.05]  # a warm-up and a decay


def _problem(seed: int = 0) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Two parameters (a 3×4 matrix, a 4-vector) of ``½ Σ (w − w*)ᵀ A (w − w*)`` per row."""
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)]
    m = torch.randn(4, 4, generator=g, dtype=F64)
    a = m @ m.mT / 4 + torch.eye(4, dtype=F64)
    targets = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)]
    return start, [a, a], targets


def _grads(params: list[Tensor], a: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
    return [(p - t) @ m for p, m, t in zip(params, a, targets)]


def _sgd_shampoo(params: list[Tensor], config: object, weight_decay: float = 0.0) -> Shampoo:
    """Shampoo reduced to its base step ``−lr·g`` (no preconditioning, filtering or grafting)."""
    return Shampoo(
        params,
        lr=LRS[0],
        weight_decay=weight_decay,
        betas=(0.0, 1.0),
        preconditioner_config=SGDPreconditionerConfig(),
        iterate_averaging_config=config,
    )


@pytest.mark.parametrize(
    "config",
    [
        GeneralizedPrimalAveragingConfig(eval_interp_coeff=0.9, train_interp_coeff=0.8),
        GeneralizedPrimalAveragingConfig(eval_interp_coeff=0.5, train_interp_coeff=1.0),
        ScheduleFreeConfig(train_interp_coeff=0.9),
        ScheduleFreeConfig(train_interp_coeff=0.5, eval_coeff_lr_power=1),
    ],
    ids=["gpa", "gpa-heavy-ball", "schedule-free", "schedule-free-p1"],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_closed_form_on_a_quadratic(config: object, weight_decay: float) -> None:
    """The pure updates of ``averaging.py``; decoupled weight decay shrinks ``z`` by
    ``1 − lr·wd`` before the step (Distributed Shampoo's: the direction carries no decay)."""
    start, a, targets = _problem()
    params = [p.clone().requires_grad_() for p in start]
    optimizer = _sgd_shampoo(params, config, weight_decay)
    ys, zs = [p.clone() for p in start], [p.clone() for p in start]
    lr_sum = torch.zeros((), dtype=F64)
    for lr in LRS:
        optimizer.param_groups[0]["lr"] = lr
        for p, g in zip(params, _grads([p.detach() for p in params], a, targets)):
            p.grad = g
        optimizer.step()
        if isinstance(config, ScheduleFreeConfig):
            mu_x = schedule_free_eval_coefficient(lr, lr_sum, config.eval_coeff_lr_power)
        else:
            mu_x = config.eval_interp_coeff  # type: ignore[attr-defined]
        updates = [-lr * g for g in _grads(ys, a, targets)]
        torch._foreach_mul_(zs, 1.0 - lr * weight_decay)
        averaging_step_(ys, zs, updates, mu_x, config.train_interp_coeff)  # type: ignore[attr-defined]
        for p, y in zip(params, ys):
            torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-13)
    assert (ys[0] - start[0]).norm() > 0.1  # it moved
    xs = [y.clone() for y in ys]
    train_to_eval_(xs, zs, config.train_interp_coeff)  # type: ignore[attr-defined]
    optimizer.eval()
    for p, x in zip(params, xs):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)
    z_state = optimizer.block_state((1, 0))["moments.averaging_z"]
    torch.testing.assert_close(z_state, zs[1], rtol=1e-12, atol=1e-13)


def test_schedule_free_adam_is_schedule_free_adamw() -> None:
    """Defazio et al.'s AdamW variant (three sequences) with this package's Adam denominator
    (``sqrt(v)/sqrt(1−β₂ᵗ) + ε``) and averaging weights ``lr²``. (Decoupled weight decay is
    Distributed Shampoo's — it shrinks ``z`` — and is pinned by the closed-form test.)"""
    beta2, eps, wd, mu_y = 0.99, 1e-8, 0.0, 0.9
    start, a, targets = _problem(seed=2)
    params = [p.clone().requires_grad_() for p in start]
    optimizer = Shampoo(
        params,
        lr=LRS[0],
        betas=(0.0, beta2),
        weight_decay=wd,
        preconditioner_config=AdamPreconditionerConfig(beta2=beta2, epsilon=eps),
        iterate_averaging_config=ScheduleFreeConfig(train_interp_coeff=mu_y),
    )
    y = [p.clone() for p in start]
    z = [p.clone() for p in start]
    x = [p.clone() for p in start]
    v = [torch.zeros_like(p) for p in start]
    total = 0.0
    for t, lr in enumerate(LRS, start=1):
        optimizer.param_groups[0]["lr"] = lr
        for p, g in zip(params, _grads([p.detach() for p in params], a, targets)):
            p.grad = g
        optimizer.step()
        total += lr**2
        for i, g in enumerate(_grads(y, a, targets)):  # the reference, a few lines
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            z[i] = z[i] - lr * g / (v[i].sqrt() / (1 - beta2**t) ** 0.5 + eps)
            x[i] = (1 - lr**2 / total) * x[i] + lr**2 / total * z[i]
            y[i] = mu_y * x[i] + (1 - mu_y) * z[i]
        for p, ref in zip(params, y):
            torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-13)
    optimizer.eval()
    for p, ref in zip(params, x):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-13)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(steps)]


def _shampoo(model: nn.Module, config: object) -> Shampoo:
    return Shampoo(
        model.parameters(),
        lr=0.02,
        betas=(0.0, 0.95),
        epsilon=1e-10,
        precondition_frequency=2,
        grafting_config=AdamPreconditionerConfig(beta2=0.99, epsilon=1e-8),
        iterate_averaging_config=config,
    )


def _train(model: nn.Module, optimizer: Shampoo, batches: list[tuple[Tensor, Tensor]]) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


CONFIGS = [GeneralizedPrimalAveragingConfig(), ScheduleFreeConfig()]


@pytest.mark.parametrize("config", CONFIGS, ids=["gpa", "schedule-free"])
def test_train_eval_round_trip_is_bitwise(config: object) -> None:
    model = _net()
    optimizer = _shampoo(model, config)
    _train(model, optimizer, _batches(5))
    y = [p.detach().clone() for p in model.parameters()]
    optimizer.eval()
    assert not optimizer.training
    x = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(x, y))
    optimizer.eval()  # already in eval mode: nothing moves
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), x))
    with pytest.raises(RuntimeError, match=r"optimizer.train\(\)"):
        optimizer.step()
    optimizer.train()
    assert optimizer.training
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), y))


def test_eval_before_any_step_keeps_the_parameters() -> None:
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = _shampoo(model, ScheduleFreeConfig())
    optimizer.eval()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("config", CONFIGS, ids=["gpa", "schedule-free"])
@pytest.mark.parametrize("saved_in", ["train", "eval"])
def test_checkpoint_resume_is_bitwise(config: object, saved_in: str) -> None:
    batches = _batches(8)
    model = _net()
    optimizer = _shampoo(model, config)
    _train(model, optimizer, batches)

    first = _net()
    first_optimizer = _shampoo(first, config)
    _train(first, first_optimizer, batches[:4])
    if saved_in == "eval":  # as Lightning's checkpoints: the averaged weights and eval-mode state
        first_optimizer.eval()
    model_state = _roundtrip(copy.deepcopy(first.state_dict()))
    optimizer_state = _roundtrip(first_optimizer.state_dict())

    resumed = _net(seed=9)
    resumed.load_state_dict(model_state)
    resumed_optimizer = _shampoo(resumed, config)
    resumed_optimizer.load_state_dict(optimizer_state)
    assert resumed_optimizer.training is (saved_in == "train")
    resumed_optimizer.train()
    _train(resumed, resumed_optimizer, batches[4:])
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)
    optimizer.eval()
    resumed_optimizer.eval()
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_skipped_blocks_keep_their_sequences() -> None:
    """A block without a gradient this step keeps ``y``, ``z`` and Schedule-Free's sum."""
    model = _net()
    optimizer = _shampoo(model, ScheduleFreeConfig())
    _train(model, optimizer, _batches(3))
    first = model[0].weight
    before, other = first.detach().clone(), model[2].weight.detach().clone()
    z = optimizer.block_state((0, 0))["moments.averaging_z"].clone()
    lr_sum = optimizer.block_state((0, 0))["status.averaging_lr_sum"].clone()
    inputs, targets = _batches(1)[0]
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    first.grad = None
    optimizer.step()
    assert torch.equal(first.detach(), before)
    assert torch.equal(optimizer.block_state((0, 0))["moments.averaging_z"], z)
    assert torch.equal(optimizer.block_state((0, 0))["status.averaging_lr_sum"], lr_sum)
    assert not torch.equal(model[2].weight.detach(), other)  # the others moved


def test_groups_without_averaging_are_left_alone() -> None:
    model = _net()
    optimizer = Shampoo(
        [
            {"params": list(model[0].parameters()), "iterate_averaging_config": ScheduleFreeConfig()},
            {"params": list(model[2].parameters())},
        ],
        lr=0.02,
        betas=(0.0, 0.95),
        grafting_config=AdamPreconditionerConfig(beta2=0.99, epsilon=1e-8),
    )
    _train(model, optimizer, _batches(4))
    plain = [p.detach().clone() for p in model[2].parameters()]
    averaged = [p.detach().clone() for p in model[0].parameters()]
    optimizer.eval()
    assert all(torch.equal(p, b) for p, b in zip(model[2].parameters(), plain))
    assert all(not torch.equal(p, b) for p, b in zip(model[0].parameters(), averaged))
    assert optimizer.param_groups[0]["train_mode"] is False and "train_mode" not in optimizer.param_groups[1]
    optimizer.train()
    assert all(torch.equal(p, b) for p, b in zip(model[0].parameters(), averaged))


def test_refusals() -> None:
    model = _net()
    with pytest.raises(ValueError, match="replaces momentum"):
        Shampoo(model.parameters(), momentum=0.9, iterate_averaging_config=ScheduleFreeConfig())


def test_a_nonfinite_saved_z_restarts_at_the_parameters() -> None:
    model = _net()
    optimizer = _shampoo(model, ScheduleFreeConfig())
    _train(model, optimizer, _batches(3))
    state = copy.deepcopy(optimizer.state_dict())
    state["state"][0]["block_0.moments.averaging_z"].view(-1)[0] = float("nan")
    fresh = _shampoo(model, ScheduleFreeConfig())
    with pytest.warns(UserWarning, match="averaging_z"):
        fresh.load_state_dict(state)
    z = fresh.block_state((0, 0))["moments.averaging_z"]
    assert torch.equal(z.view(-1), model[0].weight.detach().view(-1))
    assert torch.equal(
        fresh.block_state((2, 0))["moments.averaging_z"], state["state"][2]["block_0.moments.averaging_z"]
    )


def test_distributed_shampoos_configs_are_taken_by_their_fields() -> None:
    """Its ``ScheduleFreeConfig`` / ``GeneralizedPrimalAveragingConfig`` (same names and fields)
    become ours."""

    class ScheduleFreeConfig:
        train_interp_coeff = 0.7
        eval_coeff_lr_power = 1

    class GeneralizedPrimalAveragingConfig:
        eval_interp_coeff = 0.6
        train_interp_coeff = 0.5

    from lightning_shampoo import GeneralizedPrimalAveragingConfig as OurGPA
    from lightning_shampoo import ScheduleFreeConfig as OurFree

    group = Shampoo(_net().parameters(), iterate_averaging_config=ScheduleFreeConfig()).param_groups[0]
    assert group["iterate_averaging_config"] == OurFree(train_interp_coeff=0.7, eval_coeff_lr_power=1)
    group = Shampoo(
        _net().parameters(), iterate_averaging_config=GeneralizedPrimalAveragingConfig()
    ).param_groups[0]
    assert group["iterate_averaging_config"] == OurGPA(eval_interp_coeff=0.6, train_interp_coeff=0.5)


def _quadratic_run(groups: list[dict], lr: float | Tensor = 0.05, steps: int = 6) -> list[Tensor]:
    """Parameters after ``steps`` of the SGD-reduced Shampoo on ``_problem``'s quadratic."""
    start, a, targets = _problem()
    params = [p.clone().requires_grad_() for p in start]
    optimizer = Shampoo(
        [{**g, "params": [params[i] for i in g["params"]]} for g in groups],
        lr=lr,
        weight_decay=0.1,
        betas=(0.0, 1.0),
        preconditioner_config=SGDPreconditionerConfig(),
    )
    for _ in range(steps):
        for p, g in zip(params, _grads([p.detach() for p in params], a, targets)):
            p.grad = g
        optimizer.step()
    optimizer.eval()
    return [p.detach().clone() for p in params]


def test_mixed_configs_in_one_lane_and_a_tensor_lr() -> None:
    """Schedule-Free and GPA groups sharing a lane step as each would alone; a 0-d tensor lr
    steps as the same float."""
    free, gpa = ScheduleFreeConfig(train_interp_coeff=0.7), GeneralizedPrimalAveragingConfig()
    both = _quadratic_run(
        [{"params": [0], "iterate_averaging_config": free}, {"params": [1], "iterate_averaging_config": gpa}]
    )
    alone_free = _quadratic_run([{"params": [0, 1], "iterate_averaging_config": free}])
    alone_gpa = _quadratic_run([{"params": [0, 1], "iterate_averaging_config": gpa}])
    torch.testing.assert_close(both[0], alone_free[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(both[1], alone_gpa[1], rtol=1e-14, atol=1e-15)
    as_tensor = _quadratic_run(
        [{"params": [0, 1], "iterate_averaging_config": free}], lr=torch.tensor(0.05, dtype=F64)
    )
    for p, q in zip(as_tensor, alone_free):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)
