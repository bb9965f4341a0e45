"""Block-level controls and state accounting: pure functions of (buckets, state).

``Shampoo``'s ``set_fallback``, ``request_refresh``, ``block_state``, ``refresh_counts`` and
``state_bytes`` are thin wrappers around these; they sit off the step (host reads allowed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from ._checks import clamp_epsilon_scale
from .plan import Bucket

__all__ = [
    "block_state",
    "host_flags",
    "locate",
    "mark_fallback",
    "mark_refresh",
    "refresh_counts",
    "state_bytes_by_section",
]

State = Mapping[str, Mapping[str, Mapping[str, Tensor]]]  # bucket key → section → name → tensor


def locate(buckets: Sequence[Bucket], blocks: Iterable[tuple[int, int]]) -> dict[str, list[int]]:
    """``{bucket key: rows}`` of ``blocks`` (``(param_index, block_index)``) among ``buckets``."""
    rows: dict[tuple[int, int], tuple[str, int]] = {}
    for bucket in buckets:
        for row, block_key in enumerate(bucket.rows()):
            rows[block_key] = (bucket.key, row)
    out: dict[str, list[int]] = {}
    for param_index, block_index in blocks:
        if (param_index, block_index) not in rows:
            raise KeyError(f"no block ({param_index}, {block_index}) (param_index, block_index) here")
        bucket_key, row = rows[(param_index, block_index)]
        out.setdefault(bucket_key, []).append(row)
    return out


def mark_fallback(state: State, located: Mapping[str, list[int]], code: int) -> None:
    for key, rows in located.items():
        state[key]["status"]["fallback"][rows] = code


def mark_refresh(state: State, located: Mapping[str, list[int]], epsilon_scale: float | None) -> None:
    """Flag rows for a refresh at the next step, optionally with a larger (capped) damping."""
    for key, rows in located.items():
        status = state[key]["status"]
        status["refresh_request"][rows] = True
        if epsilon_scale is not None:
            status["epsilon_scale"][rows] = clamp_epsilon_scale(epsilon_scale)


def host_flags(buckets: Sequence[Bucket], state: State) -> tuple[set[str], set[str], set[str]]:
    """Bucket keys with a block in fallback, with a refresh requested, with a refresh missed (a
    device read: the step keeps these host mirrors so that it never reads the flags itself)."""
    held = [(b.key, state[b.key]["status"]) for b in buckets if b.key in state]
    fallback = {k for k, s in held if bool(s["fallback"].any())}
    requests = {k for k, s in held if bool(s["refresh_request"].any())}
    missed = {k for k, s in held if bool(s["refresh_missed"].any())}
    return fallback, requests, missed


def refresh_counts(buckets: Sequence[Bucket], state: State) -> tuple[int, int]:
    done = skipped = 0
    for bucket in buckets:
        status = state.get(bucket.key, {}).get("status")
        if status is not None:
            done += int(status["refreshes"].sum())
            skipped += int(status["refreshes_skipped"].sum())
    return done, skipped


def block_state(state: State, bucket_key: str, row: int) -> dict[str, Tensor]:
    """One block's ``{"section.name": tensor}`` (views of its bucket rows)."""
    return {
        f"{section}.{name}": tensor[row]
        for section, tensors in state[bucket_key].items()
        for name, tensor in tensors.items()
    }


def state_bytes_by_section(state: State) -> dict[str, int]:
    """Bytes per state section (``precond``, ``graft``, ``moments``, ``status``); a storage shared
    by several entries (the per-block ``status`` vectors of a lane) counts once, in the first
    section that holds it. The step's reusable buffers are not state and not counted."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for sections in state.values():
        for section, tensors in sections.items():
            out.setdefault(section, 0)
            for tensor in tensors.values():
                base = tensor if tensor._base is None else tensor._base
                if id(base) not in seen:
                    seen.add(id(base))
                    out[section] += base.numel() * base.element_size()
    return out
