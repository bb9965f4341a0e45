"""``ShampooFSDPStrategy``: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``,
with every ``Shampoo`` sharded across the ranks.

Checkpoints. With ``save_distributed_checkpoint=True`` (the default) each rank writes the state
of the blocks it owns under keys ``optimizer_{i}.state.{param}.block_{b}.…``: unique per block,
so torch.distributed.checkpoint keeps every rank's part (plain tensors under one key on several
ranks would be de-duplicated to a single rank's copy), the files hold ≈1/N of the state each,
and on load each rank reads exactly its blocks — for any number of ranks. With
``save_distributed_checkpoint=False`` rank 0 writes every block into a single file.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.optim import Optimizer

from ..distributed import consolidate_state_dict, local_state_dict
from ..optim import Shampoo
from .ddp import check_communication_dtype, shard_all, unwrap

__all__ = ["ShampooFSDPStrategy", "load_sharded_shampoo_state"]


class ShampooFSDPStrategy(ModelParallelStrategy):
    """FSDP2 for Shampoo: the module's ``configure_model`` applies ``fully_shard`` (with
    ``self.device_mesh["data_parallel"]``); each rank preconditions whole blocks it owns
    (gathering their gradient rows) and adds the updated rows to its shards — parameters equal
    a DDP run's. ``data_parallel_size="auto"`` with ``tensor_parallel_size="auto"`` means pure
    data parallelism over every rank (Lightning's default would put the ranks of a node on the
    tensor-parallel axis). Other arguments are ``ModelParallelStrategy``'s.
    """

    strategy_name = "shampoo_fsdp"
    consolidates_shampoo_state = True

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        communication_dtype: torch.dtype = torch.float32,
    ) -> None:
        check_communication_dtype(communication_dtype)
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.communication_dtype = communication_dtype

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
        super().setup_environment()

    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        shard_all(self.optimizers, self.communication_dtype)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        inner = unwrap(optimizer)
        if not isinstance(inner, Shampoo):
            return super().optimizer_state(optimizer)
        if self._save_distributed_checkpoint:
            return local_state_dict(inner)
        return consolidate_state_dict(inner)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning's private loaders, imported here so that a change in them cannot break
        # ``import lightning_shampoo``.
        from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint, _load_checkpoint

        shampoos = {i for i, o in enumerate(self.optimizers) if isinstance(unwrap(o), Shampoo)}
        if not shampoos:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        path = Path(self.broadcast(checkpoint_path))
        assert self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        others = {f"optimizer_{i}": o for i, o in enumerate(self.optimizers) if i not in shampoos}
        if _is_sharded_checkpoint(path):
            state = {"state_dict": self.model, **others}
            result = _load_checkpoint(path, state, strict=strict, weights_only=weights_only)
            for i in sorted(shampoos):
                load_sharded_shampoo_state(unwrap(self.optimizers[i]), path, f"optimizer_{i}")
            return result
        result = _load_checkpoint(path, {"state_dict": self.model}, strict=strict, weights_only=weights_only)
        for i, optimizer in enumerate(self.optimizers):
            saved = result["optimizer_states"][i]
            if i in shampoos:
                unwrap(optimizer).load_state_dict(saved)  # keeps the blocks this rank owns
            else:
                _load_full_optimizer_state(self.model, optimizer, saved, strict)
        return result

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "shampoo_fsdp" not in strategy_registry:
            strategy_registry.register(
                "shampoo_fsdp", cls, description="FSDP2 (ModelParallelStrategy) sharding Shampoo's blocks"
            )


def load_sharded_shampoo_state(optimizer: Shampoo, path: Path, key: str) -> None:
    """Read the state of the blocks this rank owns (and the param groups) from a distributed
    checkpoint saved under ``key`` by any number of ranks, then load it."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    owned = {row for bucket in optimizer.buckets for row in bucket.rows()}
    state_prefix, group_prefix = f"{key}.state.", f"{key}.param_groups."
    state: dict[int, dict[str, Any]] = {}
    groups: dict[int, dict[str, Any]] = {}
    for fqn, meta in FileSystemReader(path).read_metadata().state_dict_metadata.items():
        is_tensor = isinstance(meta, TensorStorageMetadata)
        placeholder = torch.empty(meta.size, dtype=meta.properties.dtype) if is_tensor else None  # type: ignore[union-attr]
        if fqn.startswith(state_prefix):
            param, name = fqn[len(state_prefix) :].split(".", 1)
            block = int(name.split(".", 1)[0][len("block_") :])
            if (int(param), block) in owned:
                state.setdefault(int(param), {})[name] = placeholder
        elif fqn.startswith(group_prefix):
            group, name = fqn[len(group_prefix) :].split(".", 1)
            groups.setdefault(int(group), {})[name] = placeholder
    if not groups:
        raise ValueError(f"{path} holds no Shampoo optimizer state under {key!r}")
    request = {key: {"state": state, "param_groups": [groups[g] for g in sorted(groups)]}}
    load(request, checkpoint_id=path)
    optimizer.load_state_dict(request[key])


def _load_full_optimizer_state(module: Any, optimizer: Any, saved: dict[str, Any], strict: bool) -> None:
    """A torch optimizer beside Shampoo, loaded from a single-file checkpoint as Lightning does."""
    from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
    saved = _rekey_optimizer_state_if_needed(saved, module)
    set_optimizer_state_dict(module, unwrap(optimizer), optim_state_dict=saved, options=options)
