"""Storage dtypes of the Kronecker-factor families' state (Shampoo, KL-Shampoo, SOAP)."""

from __future__ import annotations

import torch

from .base import check_dtype

__all__ = ["STATE_DTYPES", "check_optional_dtype"]

#: What a factor, root, eigenbasis or eigenvalue may be stored in (``eigh`` needs float32+).
STATE_DTYPES = (torch.float32, torch.float64)


def check_optional_dtype(name: str, dtype: torch.dtype | None) -> None:
    """``None`` (the parameter's dtype, at least float32) or one of :data:`STATE_DTYPES`."""
    if dtype is not None:
        check_dtype(name, dtype, STATE_DTYPES)
