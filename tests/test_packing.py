"""Symmetric packing (``use_symmetric_packing``): factors and cached roots stored as their upper
triangle train exactly like full storage (to rounding), take about half the memory, and
checkpoints cross between the two layouts either way."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_shampoo import (
    AdamPreconditionerConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    KLShampooPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    Shampoo,
)
from lightning_shampoo.linalg.packing import pack, packed_size, unpack, unpacked_dim

F64 = torch.float64
CONFIGS: dict[str, Any] = {
    "root_inv": RootInvShampooPreconditionerConfig,
    "eigen": EigendecomposedShampooPreconditionerConfig,
    "kl": KLShampooPreconditionerConfig,
    "soap": EigenvalueCorrectedShampooPreconditionerConfig,
}


def test_pack_and_unpack_round_trip() -> None:
    a = torch.randn(3, 5, 5, dtype=F64)
    sym = a + a.mT
    packed = pack(sym)
    assert packed.shape == (3, packed_size(5)) == (3, 15)
    assert torch.equal(unpack(packed), sym)
    assert unpacked_dim(15) == 5
    with pytest.raises(ValueError):
        unpacked_dim(14)


def _run(config: Any, packing: bool, steps: int = 9, **kwargs: Any) -> tuple[list[torch.Tensor], Shampoo]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(12, 8, dtype=F64)), nn.Parameter(torch.randn(8, dtype=F64))]
    opt = Shampoo(
        params,
        lr=0.02,
        betas=(0.9, 0.95),
        epsilon=1e-8,
        precondition_frequency=3,
        max_preconditioner_dim=8,
        grafting_config=AdamPreconditionerConfig(),
        preconditioner_config=config(use_symmetric_packing=packing, **kwargs),
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=F64) + 0.1 * p.detach()
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_storage_trains_like_full_storage_in_about_half_the_memory(name: str) -> None:
    packed, opt_packed = _run(CONFIGS[name], True)
    full, opt_full = _run(CONFIGS[name], False)
    for a, b in zip(packed, full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    factors = [k for k in opt_packed.block_state((0, 0)) if k.startswith("precond.factor.")]
    assert factors and all(opt_packed.block_state((0, 0))[k].ndim == 1 for k in factors)
    # SOAP packs only its factors (its eigenvectors are not symmetric); the others their roots too.
    assert opt_packed.state_bytes() < (0.9 if name == "soap" else 0.8) * opt_full.state_bytes()


@pytest.mark.parametrize(("saved", "loaded"), [(True, False), (False, True)])
def test_checkpoints_cross_packing_either_way(saved: bool, loaded: bool) -> None:
    config = RootInvShampooPreconditionerConfig
    _, source = _run(config, saved, steps=4)
    reference_params, _ = _run(config, saved, steps=9)
    # Resume a fresh optimizer of the other layout from step 4, on the same parameters' values.
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(12, 8, dtype=F64)), nn.Parameter(torch.randn(8, dtype=F64))]
    for p, q in zip(params, source.param_groups[0]["params"]):
        p.data.copy_(q.detach())
    resumed = Shampoo(
        params,
        lr=0.02,
        betas=(0.9, 0.95),
        epsilon=1e-8,
        precondition_frequency=3,
        max_preconditioner_dim=8,
        grafting_config=AdamPreconditionerConfig(),
        preconditioner_config=config(use_symmetric_packing=loaded),
    )
    resumed.load_state_dict(source.state_dict())
    g = torch.Generator().manual_seed(1)
    for step in range(9):
        grads = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        if step < 4:
            continue
        for p, grad in zip(params, grads):
            p.grad = grad + 0.1 * p.detach()
        resumed.step()
    for a, b in zip(params, reference_params):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
