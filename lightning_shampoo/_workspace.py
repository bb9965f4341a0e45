"""The step's workspace: declared state, persistent buffers and cached views for one rank's buckets.

Built once from the plan (and rebuilt only when the plan, the devices or a param group's structure
change), so that a plain step allocates nothing and creates almost no views:

* **State**, declared up front by each bucket's kernels (``state_schema``) and by the optimizer
  (``moments``: the filtered gradient and momentum; ``status``: per-block bookkeeping — step
  count, refresh step, failure and non-finite counters, fallback mode, damping scale, refresh
  counts, the spectrum of the last refresh). Per-block scalars of every bucket of a *lane* live
  in one ``[N]`` tensor per name (each bucket's state entry is a view of its rows), so one
  vector op updates them all.
* **Lanes**: buckets that share a compute dtype and device. A lane owns a flat gradient buffer
  ``grad`` and a flat direction buffer ``out`` (each bucket's ``[n, *block]`` tensors are views
  of them), a ``scratch`` view per bucket (the gradient buffer once the gradient is consumed, or
  rows of an extra buffer where the filtered gradient *is* the gradient), per-block vectors, and
  the strided views that move a parameter's regions to and from bucket rows with one
  ``torch._foreach_*`` call per lane.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ._ema_rows import BETA1, BETA2, DIAGONAL, GRAFT, ema_table, ema_view
from .blocking import ParamLayout, Region
from .plan import Bucket
from .preconditioners import Context, Preconditioner
from .preconditioners.base import StateSpec, outer_operands, per_block

__all__ = [
    "SECTIONS",
    "Lane",
    "Slot",
    "Workspace",
    "averages",
    "averaging_rows",
    "bucket_schema",
    "compute_dtype",
    "param_view",
]

#: State sections of a bucket: the preconditioner's statistics, the grafting preconditioner's,
#: the optimizer's moments (filtered gradient, momentum) and its per-block status.
SECTIONS = ("precond", "graft", "moments", "status")
#: Rows of the lane's EMA table: β₁ (the filtered gradient), the group's β₂ (Kronecker factors,
#: SOAP's second moment), the β₂ of a diagonal main kernel and of the grafting kernel.


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Gradients are processed in at least float32 (bf16/fp16 parameters too)."""
    return torch.promote_types(param_dtype, torch.float32)


def averages(options: Mapping[str, Any]) -> bool:
    """Whether a group runs iterate averaging (GPA or Schedule-Free; ``averaging.py``)."""
    return options.get("iterate_averaging_config") is not None


def _status_schema(
    kernel: Preconditioner, options: Mapping[str, Any], dtype: torch.dtype
) -> dict[str, StateSpec]:
    schema = {
        "step": StateSpec((), torch.int64),  # steps this block took part in (bias corrections)
        "refresh_step": StateSpec((), torch.int64, -1),
        "failures": StateSpec((), torch.int32),
        "nonfinite": StateSpec((), torch.int32),
        "fallback": StateSpec((), torch.int8),
        "epsilon_scale": StateSpec((), torch.float32, 1.0),
        "refresh_request": StateSpec((), torch.bool, False),
        "refresh_missed": StateSpec((), torch.bool, False),  # due while its gradient was missing
        "refreshes": StateSpec((), torch.int32),
        "refreshes_skipped": StateSpec((), torch.int32),
    }
    for i in kernel.factor_dims:
        for name in ("condition_number", "min_eigenvalue", "max_eigenvalue"):
            schema[f"{name}.{i}"] = StateSpec((), torch.float32, math.nan)
    if options.get("refresh_tolerance") is not None:
        schema["drift"] = StateSpec((), torch.float32, math.nan)
    if options["momentum"] > 0.0:
        schema["momentum_started"] = StateSpec((), torch.bool, False)  # torch SGD's first step
    if averages(options):
        schema["averaging_lr_sum"] = StateSpec((), dtype)  # Schedule-Free's Σ lrᵖ
    return schema


def _moments_schema(
    kernel: Preconditioner, block_shape: tuple[int, ...], dtype: torch.dtype, options: Mapping[str, Any]
) -> dict[str, StateSpec]:
    schema = {}
    if options["betas"][0] > 0.0 and not kernel.keeps_first_moment:
        schema["filtered_grad"] = StateSpec(block_shape, dtype)
    if options["momentum"] > 0.0:
        schema["momentum_buffer"] = StateSpec(block_shape, dtype)
    if averages(options):
        # Iterate averaging: z, the base optimizer's iterates (starts at the parameters), and the
        # train point y saved by ``Shampoo.eval()`` (restored bitwise by ``train()``).
        schema["averaging_z"] = StateSpec(block_shape, dtype)
        schema["averaging_y"] = StateSpec(block_shape, dtype)
    return schema


def bucket_schema(
    bucket: Bucket, dtype: torch.dtype, options: Mapping[str, Any]
) -> dict[str, dict[str, StateSpec]]:
    """Every state tensor of a bucket, per section (``dtype``: its gradients' compute dtype)."""
    return {
        "precond": bucket.kernel.state_schema(dtype, options),
        "graft": {} if bucket.graft is None else bucket.graft.state_schema(dtype, options),
        "moments": _moments_schema(bucket.kernel, bucket.block_shape, dtype, options),
        "status": _status_schema(bucket.kernel, options, dtype),
    }


@dataclass
class RegionLink:
    """One region of a parameter and the same blocks in the lane's buffers (same index space)."""

    layout: ParamLayout
    region: Region
    grad_rows: Tensor  # rows of the lane's gradient buffer, [g₁, b₁, g₂, b₂, …]
    out_rows: Tensor  # rows of the lane's direction buffer
    row: int  # lane row of the region's first block
    #: ``grad_rows`` in the parameter's own shape, where its blocks tile the whole parameter in
    #: row-major order (one region whose rows are contiguous): a gradient of any strides is then
    #: copied in as it is, with no view made per step.
    grad_like_param: Tensor | None = None


@dataclass
class Slot:
    """One bucket in a lane: its state, its context and its views of the lane's buffers."""

    bucket: Bucket
    state: dict[str, dict[str, Tensor]]
    ctx: Context
    graft_ctx: Context  # the same, with the grafting kernel's EMA as ``diagonal``
    start: int  # lane row of the bucket's first block
    grad: Tensor  # [n, *block] views
    out: Tensor
    scratch: Tensor
    links: list[RegionLink]

    @property
    def n(self) -> int:
        return self.bucket.size

    @property
    def kernel(self) -> Preconditioner:
        return self.bucket.kernel

    @property
    def moment(self) -> Tensor:
        """The β₁-filtered gradient buffer (unnormalised), or the gradient itself for β₁ = 0."""
        return self.state["moments"].get("filtered_grad", self.grad)

    def rows(self, vector: Tensor) -> Tensor:
        return vector[self.start : self.start + self.n]


def _blocks(x: Tensor) -> list[Tensor]:
    """Per-block views (``x[i]``) of a bucket tensor."""
    return list(x.unbind(0))


@dataclass
class Lane:
    """Buckets of one compute dtype and device; see the module docstring."""

    dtype: torch.dtype
    device: torch.device
    slots: list[Slot]
    grad: Tensor  # flat buffers
    out: Tensor
    extra: Tensor | None  # scratch rows for buckets whose filtered gradient is the gradient
    status: dict[str, Tensor]  # [N] per status name (each bucket's entries are views)
    vectors: dict[str, Tensor]  # [N] per-step values (norms, masks, scales)
    table: dict[str, Tensor]  # [3, N] EMA rows: betas, logs, keep, weight, correction
    grad_blocks: list[Tensor]
    out_blocks: list[Tensor]
    cache: dict[Any, Any] = field(default_factory=dict)  # per-step lists keyed by host flags

    def __post_init__(self) -> None:
        self.one = torch.ones((), dtype=self.dtype, device=self.device)
        self.zero = torch.zeros((), dtype=self.dtype, device=self.device)

    @property
    def size(self) -> int:
        return sum(s.n for s in self.slots)


class Workspace:
    """State allocation and the lanes of one rank's buckets (see the module docstring)."""

    def __init__(
        self,
        buckets: Sequence[Bucket],
        state: dict[str, dict[str, dict[str, Tensor]]],
        params: Sequence[Tensor],
        groups: Sequence[Mapping[str, Any]],
    ) -> None:
        self.signature = signature(groups)
        by_lane: dict[tuple[torch.dtype, torch.device], list[Bucket]] = {}
        for bucket in buckets:
            first = params[bucket.members[0].param.index]
            key = (compute_dtype(first.dtype), _local(first).device)
            by_lane.setdefault(key, []).append(bucket)
        self.lanes = [
            _build_lane(dtype, device, members, state, groups, params)
            for (dtype, device), members in by_lane.items()
        ]
        self._anchors = [(lane, params[lane.slots[0].links[0].layout.index]) for lane in self.lanes]

    def valid_for(self, state: Mapping[str, Any], groups: Sequence[Mapping[str, Any]]) -> bool:
        """Whether the cached views still point at the optimizer's state tensors, the parameters'
        devices and the groups' structure (host-side identity checks, no device work)."""
        if signature(groups) != self.signature:
            return False
        for lane in self.lanes:
            for slot in lane.slots:
                current = state.get(slot.bucket.key)
                if current is not slot.state or current["status"]["step"] is not slot.ctx.block_step:
                    return False
        return all(_local(p).device == lane.device for lane, p in self._anchors)


def signature(groups: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    """The group options the workspace's structure depends on (host values, compared each step)."""
    keys = (
        "betas",
        "beta3",
        "momentum",
        "dampening",
        "use_nesterov",
        "weight_decay",
        "use_decoupled_weight_decay",
        "use_bias_correction",
        "refresh_tolerance",
        "epsilon",
        "iterate_averaging_config",
    )
    return tuple(tuple(g.get(k) for k in keys) for g in groups)


def _local(p: Tensor) -> Tensor:
    """A parameter's local tensor (an FSDP2 ``DTensor``'s shard) for its dtype and device."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


def allocate_state(
    bucket: Bucket,
    dtype: torch.dtype,
    device: torch.device,
    options: Mapping[str, Any],
    existing: dict | None,
) -> dict[str, dict[str, Tensor]]:
    """The bucket's declared state: existing tensors are kept (moved to ``device`` if needed),
    missing ones allocated with their initial values."""
    existing = existing or {}
    out: dict[str, dict[str, Tensor]] = {}
    for section, specs in bucket_schema(bucket, dtype, options).items():
        have = existing.get(section, {})
        out[section] = {}
        for name, spec in specs.items():
            tensor = have.get(name)
            if tensor is None:
                tensor = spec.allocate(bucket.size, device)
            elif tensor.device != device:
                tensor = tensor.to(device)
            out[section][name] = tensor
        for name, tensor in have.items():  # entries of a schema no longer in force are kept
            out[section].setdefault(name, tensor)
    return out


def _needs_scratch(bucket: Bucket, options: Mapping[str, Any]) -> bool:
    """Whether the bucket needs scratch rows of its own: the gradient buffer is busy for the
    whole step when it *is* the filtered gradient (β₁ = 0, or β₃ ≠ β₁ leaves the current value
    there) or when the kernel keeps its first moment itself (SOAP rotates the gradient in place)."""
    beta1 = options["betas"][0]
    beta3 = beta1 if options["beta3"] < 0 else options["beta3"]
    return bucket.kernel.keeps_first_moment or beta1 == 0.0 or beta3 != beta1


def _build_lane(
    dtype: torch.dtype,
    device: torch.device,
    buckets: list[Bucket],
    state: dict[str, dict[str, dict[str, Tensor]]],
    groups: Sequence[Mapping[str, Any]],
    params: Sequence[Tensor],
) -> Lane:
    sizes = [b.size for b in buckets]
    total_rows, total_numel = sum(sizes), sum(b.numel for b in buckets)
    grad = torch.zeros(max(total_numel, 1), dtype=dtype, device=device)
    out = torch.zeros_like(grad)
    needs_extra = [b for b in buckets if _needs_scratch(b, groups[b.group])]
    extra = (
        torch.zeros(max(sum(b.numel for b in needs_extra), 1), dtype=dtype, device=device)
        if needs_extra
        else None
    )
    # Per-bucket state, with per-block scalars gathered into one lane tensor per status name.
    states = {b.key: allocate_state(b, dtype, device, groups[b.group], state.get(b.key)) for b in buckets}
    fresh_z = [
        b.key
        for b in buckets
        if "averaging_z" in states[b.key]["moments"]
        and "averaging_z" not in (state.get(b.key) or {}).get("moments", {})
    ]
    names: dict[str, Tensor] = {}
    for b in buckets:
        for name, tensor in states[b.key]["status"].items():
            names.setdefault(name, tensor)
    status: dict[str, Tensor] = {}
    for name, example in names.items():
        lane_tensor = torch.zeros(total_rows, dtype=example.dtype, device=device)
        row = 0
        for b in buckets:
            part = lane_tensor[row : row + b.size]
            own = states[b.key]["status"].get(name)
            if own is not None:
                part.copy_(own)
                states[b.key]["status"][name] = part
            row += b.size
        status[name] = lane_tensor
    for b in buckets:
        state[b.key] = states[b.key]
    vectors = {
        name: torch.zeros(total_rows, dtype=dtype, device=device)
        for name in (
            "gnorm",
            "dnorm",
            "anorm",
            "alive_f",
            "ok_f",
            "ratio",
            "scale",
            "bcscale",
            "decay",
            "aux",
            "avg_lr",
            "avg_w",
            "avg_cx",
            "avg_cu",
        )
    }
    for name in ("present", "alive", "ok", "flag"):
        vectors[name] = torch.zeros(total_rows, dtype=torch.bool, device=device)
    table = ema_table(buckets, groups, total_rows, dtype, device)
    slots: list[Slot] = []
    row = numel = extra_numel = 0
    for b in buckets:
        options = groups[b.group]
        shape = (b.size, *b.block_shape)
        g = grad[numel : numel + b.numel].view(shape)
        o = out[numel : numel + b.numel].view(shape)
        if b in needs_extra:
            assert extra is not None
            scratch = extra[extra_numel : extra_numel + b.numel].view(shape)
            extra_numel += b.numel
        else:
            scratch = g
        rows = slice(row, row + b.size)
        beta1, beta2 = options["betas"]
        beta3 = beta1 if options["beta3"] < 0 else options["beta3"]
        st = states[b.key]
        ctx = Context(
            step=0,
            beta2=beta2,
            epsilon=options["epsilon"],
            use_bias_correction=options["use_bias_correction"],
            live=vectors["alive_f"][rows],
            block_step=st["status"]["step"],
            ema2=ema_view(table, BETA2, beta2, rows),
            ema1=ema_view(table, BETA1, beta1, rows),
            diagonal=ema_view(table, DIAGONAL, getattr(b.kernel, "beta2", 1.0), rows),
            epsilon_scale=st["status"]["epsilon_scale"],
            beta1=beta1 if beta3 == beta1 else None,
            beta3=beta3,
            grad_buffer=g,
            grad_operands=_view_operands(g, len(b.block_shape)),
        )
        links = []
        for m in b.members:
            base = numel + m.offset * math.prod(b.block_shape)
            grad_rows = _rows(m.region, grad, base)
            whole = grad_rows.numel() == math.prod(m.param.shape) and grad_rows.is_contiguous()
            like = grad_rows.view(m.param.shape) if whole else None
            out_rows = _rows(m.region, out, base)
            links.append(RegionLink(m.param, m.region, grad_rows, out_rows, row + m.offset, like))
        graft_ctx = replace(ctx, diagonal=ema_view(table, GRAFT, getattr(b.graft, "beta2", 1.0), rows))
        slots.append(Slot(b, st, ctx, graft_ctx, row, g, o, scratch, links))
        row += b.size
        numel += b.numel
    for slot in slots:
        if slot.bucket.key in fresh_z:
            _start_at_parameters(slot, params)
    return Lane(
        dtype=dtype,
        device=device,
        slots=slots,
        grad=grad,
        out=out,
        extra=extra,
        status=status,
        vectors=vectors,
        table=table,
        grad_blocks=[blk for s in slots for blk in _blocks(s.grad)],
        out_blocks=[blk for s in slots for blk in _blocks(s.out)],
    )


def averaging_rows(slot: Slot, name: str) -> list[Tensor]:
    """Per region link of ``slot``: the rows of its ``moments[name]`` bucket tensor, laid out as
    the region's parameter view (``[g₁, b₁, g₂, b₂, …]``, as ``RegionLink.grad_rows``)."""
    flat = slot.state["moments"][name].view(-1)
    numel = math.prod(slot.bucket.block_shape)
    return [link.region.rows_view(flat[(link.row - slot.start) * numel :], 0) for link in slot.links]


def _start_at_parameters(slot: Slot, params: Sequence[Tensor]) -> None:
    """Iterate averaging's sequences start at the parameters (state allocated, not loaded)."""
    views = [link.region.split_view(link.layout.processed(params[link.layout.index])) for link in slot.links]
    for name in ("averaging_z", "averaging_y"):
        torch._foreach_copy_(averaging_rows(slot, name), views)


def _view_operands(grad: Tensor, order: int) -> dict[int, tuple[Tensor, Tensor]]:
    """The outer-product operands of each dim that are *views* of the gradient buffer (a
    reshape that had to copy would go stale), to be made once instead of every step."""
    out = {}
    storage = grad.untyped_storage().data_ptr()
    for i in range(order):
        left, right = outer_operands(grad, i)
        if left.untyped_storage().data_ptr() == storage and right.untyped_storage().data_ptr() == storage:
            out[i] = (left, right)
    return out


def _rows(region: Region, flat: Tensor, base: int) -> Tensor:
    """``region.rows_view`` of ``flat`` with the region's first block at element ``base``."""
    return region.rows_view(flat[base:], 0)


def shaped(vector: Tensor, slot: Slot, ndim: int) -> Tensor:
    """A lane vector's rows of ``slot`` as ``[n, 1, …]``."""
    return per_block(slot.rows(vector), ndim)


def param_view(lane: Lane, link: RegionLink, params: Sequence[Tensor], persistent: bool) -> Tensor:
    """The region of its parameter ``link`` addresses, as ``[g₁, b₁, g₂, b₂, …]``; cached for the
    optimizer's own parameters (FSDP's gathered full values change every step)."""
    p = params[link.layout.index]
    if not persistent:
        return link.region.split_view(link.layout.processed(p))
    key = ("param", id(link))
    view = lane.cache.get(key)
    if view is None:
        view = lane.cache[key] = link.region.split_view(link.layout.processed(p))
    return view
