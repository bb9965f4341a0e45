"""The bucketed path (one batched kernel per bucket of same-shape blocks) equals the
one-block-at-a-time reference path, and stacked parameters equal separate ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_shampoo import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    KLShampooPreconditionerConfig,
    QREigendecompositionConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
)

SHAPES = [(96, 64), (70, 40), (64, 32), (96,), (70,)]
STEPS = 10

CONFIGS: dict[str, dict[str, Any]] = {
    "root_inv": dict(
        preconditioner_config=RootInvShampooPreconditionerConfig(),
        grafting_config=AdamPreconditionerConfig(),
        momentum=0.5,
        weight_decay=0.01,
    ),
    "eigendecomposed": dict(
        preconditioner_config=EigendecomposedShampooPreconditionerConfig(),
        grafting_config=AdaGradPreconditionerConfig(),
    ),
    "eigendecomposed_qr": dict(
        preconditioner_config=EigendecomposedShampooPreconditionerConfig(
            amortized_computation_config=QREigendecompositionConfig()
        ),
    ),
    "soap": dict(preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig()),
    "soap_qr": dict(
        preconditioner_config=EigenvalueCorrectedShampooPreconditionerConfig(
            amortized_computation_config=QREigendecompositionConfig()
        ),
        weight_decay=0.01,
        use_decoupled_weight_decay=False,
    ),
    "kl": dict(
        preconditioner_config=KLShampooPreconditionerConfig(), grafting_config=AdamPreconditionerConfig()
    ),
    "kl_corrected": dict(preconditioner_config=KLShampooPreconditionerConfig(eigenvalue_correction=True)),
}


def _grads(shapes: list[tuple[int, ...]], steps: int, seed: int) -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _run(
    params: list[Tensor],
    grads: list[list[Tensor]],
    make: Callable[[list[Tensor]], Shampoo],
) -> Shampoo:
    """Train with gradients ``G_t + 0.1·p`` (so the trajectory feeds back into the gradients)."""
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g + 0.1 * p.detach()
        opt.step()
    return opt


def _relative(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _fresh_params(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bucketed_equals_one_block_at_a_time(name):
    kwargs = dict(
        lr=0.01,
        betas=(0.9, 0.99),
        epsilon=1e-8,
        max_preconditioner_dim=32,
        precondition_frequency=3,
        **CONFIGS[name],
    )
    grads = _grads(SHAPES, STEPS, seed=1)
    initial = _fresh_params()
    bucketed_params = [torch.nn.Parameter(p.detach().clone()) for p in initial]
    looped_params = [torch.nn.Parameter(p.detach().clone()) for p in initial]
    bucketed = _run(bucketed_params, grads, lambda ps: Shampoo(ps, use_bucketing=True, **kwargs))
    looped = _run(looped_params, grads, lambda ps: Shampoo(ps, use_bucketing=False, **kwargs))

    # Bucket counts: (32,32) x 10 blocks from three parameters, (32,8) x 2, (6,32), (6,8),
    # (32,) x 5 from both biases, (6,): six buckets; the reference has one per block (20).
    sizes = sorted((p.block_shape, p.size) for p in bucketed.buckets)
    assert sizes == [((6,), 1), ((6, 8), 1), ((6, 32), 1), ((32,), 5), ((32, 8), 2), ((32, 32), 10)]
    shared = next(p for p in bucketed.buckets if p.block_shape == (32, 32))
    assert {m.param.index for m in shared.members} == {0, 1, 2}
    assert len(looped.buckets) == 20 and all(p.size == 1 for p in looped.buckets)

    for a, b, p0 in zip(bucketed_params, looped_params, initial):
        assert not torch.equal(a.detach(), p0.detach())
        assert _relative(a.detach(), b.detach()) <= 1e-6

    # The whole state, block by block (the checkpoint format is independent of buckets).
    state_a, state_b = bucketed.state_dict()["state"], looped.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for pidx in state_a:
        assert state_a[pidx].keys() == state_b[pidx].keys()
        for key, value in state_a[pidx].items():
            other = state_b[pidx][key]
            if value.is_floating_point():
                finite = torch.isfinite(value)
                assert torch.equal(finite, torch.isfinite(other)), key  # nan health figures match
                assert _relative(value[finite], other[finite]) <= 1e-6 or value[finite].abs().max() < 1e-30, (
                    pidx,
                    key,
                )
            else:
                assert torch.equal(value, other), (pidx, key)
    # The preconditioner did something: every block was refreshed at step 9.
    assert all(r.last_refresh_step == 9 for r in bucketed.health())


@pytest.mark.parametrize("name", ["root_inv", "soap", "kl"])
def test_stacked_parameter_equals_separate_parameters(name):
    experts, d = 4, 16
    kwargs = dict(
        lr=0.01, betas=(0.9, 0.99), epsilon=1e-8, max_preconditioner_dim=32, precondition_frequency=2
    )
    kwargs.update(CONFIGS[name])
    kwargs.pop("weight_decay", None)
    g = torch.Generator().manual_seed(3)
    init = torch.randn(experts, d, d, generator=g)
    grads = [torch.randn(experts, d, d, generator=g) for _ in range(6)]

    stacked = torch.nn.Parameter(init.clone())
    opt_stacked = Shampoo([{"params": [stacked], "stacked": True}], **kwargs)
    assert [(p.block_shape, p.size) for p in opt_stacked.buckets] == [((d, d), experts)]
    separate = [torch.nn.Parameter(init[e].clone()) for e in range(experts)]
    opt_separate = Shampoo(separate, **kwargs)
    for grad in grads:
        stacked.grad = grad.clone()
        for e, p in enumerate(separate):
            p.grad = grad[e].clone()
        opt_stacked.step()
        opt_separate.step()
    assert not torch.equal(stacked.detach(), init)
    for e, p in enumerate(separate):
        assert _relative(stacked.detach()[e], p.detach()) <= 1e-6
    # Expert e's state is stacked block e.
    sd_stacked, sd_separate = opt_stacked.state_dict()["state"], opt_separate.state_dict()["state"]
    for e in range(experts):
        for key, value in sd_separate[e].items():
            other = sd_stacked[0][key.replace("block_0.", f"block_{e}.", 1)]
            if value.is_floating_point() and torch.isfinite(value).all():
                assert _relative(other, value) <= 1e-6 or value.abs().max() == 0, key
