"""The EMA table of a lane: per block and per EMA (β₁'s filtered gradient, β₂'s statistics, the
diagonal kernel's and the grafting kernel's second moments), the constants ``(β, log c, shift)``
and the rows ``_stages.ema_table`` rewrites every step (``keep``, ``weight``, the bias correction
``1 − c·βᵗ⁻ˢ`` and its square root). Kernels see their rows as ``Ema`` views."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .plan import Bucket
from .preconditioners import DiagonalPreconditioner, Preconditioner
from .preconditioners._context import Ema

__all__ = ["BETA1", "BETA2", "DIAGONAL", "GRAFT", "ROWS", "ema_table", "ema_view"]

BETA1, BETA2, DIAGONAL, GRAFT = range(4)
ROWS = 4


def ema_view(table: dict[str, Tensor], row: int, beta: float, rows: slice) -> Ema:
    return Ema(
        beta=beta,
        keep=table["keep"][row, rows],
        weight=table["weight"][row, rows],
        correction=table["correction"][row, rows],
        root=table["root"][row, rows],
    )


def diagonal_row(kernel: Preconditioner | None, corrected: bool) -> tuple[float, float, float]:
    beta = kernel.beta2 if isinstance(kernel, DiagonalPreconditioner) else 1.0
    if isinstance(kernel, DiagonalPreconditioner) and kernel.bias_corrected(corrected) and beta < 1.0:
        return (beta, 0.0, 0.0)
    return (beta, -math.inf, 0.0)


def bias_rows(bucket: Bucket, options: Mapping[str, Any]) -> list[tuple[float, float, float]]:
    """Per EMA row: ``(β, log c, shift)`` such that the correction is ``1 − c·βᵗ⁻ˢʰⁱᶠᵗ``; a
    row without bias correction gets ``c = 0`` (``log c = −inf``) and so correction 1."""
    beta1, beta2 = options["betas"]
    beta3 = beta1 if options["beta3"] < 0 else options["beta3"]
    corrected = options["use_bias_correction"]
    row1 = (beta1, -math.inf, 0.0)
    if corrected and 0.0 < beta1 < 1.0 and beta3 > 0.0:
        row1 = (beta1, math.log(beta3), 1.0)  # 1 − β₃·β₁ᵗ⁻¹
    row2 = (beta2, 0.0, 0.0) if corrected and beta2 < 1.0 else (beta2, -math.inf, 0.0)
    return [row1, row2, diagonal_row(bucket.kernel, corrected), diagonal_row(bucket.graft, corrected)]


def ema_table(
    buckets: Sequence[Bucket],
    groups: Sequence[Mapping[str, Any]],
    n: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    """Constants and per-step rows of the lane's EMAs (see ``_stages.ema_table``)."""
    rows: list[list[tuple[float, float, float]]] = []
    for b in buckets:
        rows += [bias_rows(b, groups[b.group])] * b.size
    column = [[r[k] for r in rows] for k in range(ROWS)]
    beta = torch.tensor([[c[0] for c in col] for col in column], dtype=torch.float64, device=device).reshape(
        ROWS, n
    )
    log_c = torch.tensor([[c[1] for c in col] for col in column], dtype=torch.float64, device=device).reshape(
        ROWS, n
    )
    shift = torch.tensor([[c[2] for c in col] for col in column], dtype=torch.float64, device=device).reshape(
        ROWS, n
    )
    log_beta = torch.where(torch.isinf(log_c), 0.0, torch.log(beta.clamp_min(1e-300)))
    correction = torch.ones(ROWS, n, dtype=dtype, device=device)
    # ``keep`` and ``weight`` are the two halves of one tensor so that one ``where`` sets both:
    # ``(β, 1−β)`` on live blocks, ``(1, 0)`` on dead ones.
    keep_weight = torch.stack([torch.ones(ROWS, n), torch.zeros(ROWS, n)]).to(dtype=dtype, device=device)
    return {
        "live_keep_weight": torch.stack([beta, 1.0 - beta]).to(dtype),
        "dead_keep_weight": torch.tensor([1.0, 0.0], dtype=dtype, device=device).view(2, 1, 1),
        "keep_weight": keep_weight,
        "log_beta": log_beta,
        # log(c·β^-shift); 1 − c·βᵗ⁻ˢ is computed as −expm1(t·log β + offset)
        "offset": torch.where(torch.isinf(log_c), log_c, log_c - shift * log_beta),
        "t": torch.zeros(n, dtype=torch.float64, device=device),
        "power": torch.zeros(ROWS, n, dtype=torch.float64, device=device),
        "correction": correction,
        "correction1": correction[BETA1],
        "keep": keep_weight[0],
        "weight": keep_weight[1],
        "root": torch.ones(ROWS, n, dtype=dtype, device=device),
        "inverse1": torch.ones(n, dtype=dtype, device=device),
    }
