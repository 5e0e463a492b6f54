"""Sharded checkpoints of a planned model with torch.distributed.checkpoint (DCP).

Every rank writes its own shards (value-table shards and FSDP shards are DTensors) and the
metadata records the global layout, so a checkpoint saved by 4 ranks loads into 2 (or
into another plan): DCP reads each rank's new shard from whichever files hold it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def _optimizers(optimizer) -> tuple[torch.optim.Optimizer, ...]:
    if optimizer is None:
        return ()
    if isinstance(optimizer, torch.optim.Optimizer):
        return (optimizer,)
    return tuple(optimizer)


def save_distributed(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> None:
    """Save `model` (and the optimizer state) from every rank into directory `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, _optimizers(optimizer))
    state = {"model": model_state}
    if optimizer is not None:
        state["optim"] = optim_state
    dcp.save(state, checkpoint_id=os.fspath(path))
    log.info("saved a distributed checkpoint to %s", path)


def load_distributed(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> None:
    """Load a `save_distributed` checkpoint into `model` (laid out by `apply_plan`, any
    world size) and the optimizer, in place, on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = _optimizers(optimizer)
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state}
    if optimizers:
        state["optim"] = optim_state
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(
        model,
        optimizers,
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
    )
    log.info("loaded the distributed checkpoint %s", path)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of a planned model, on CPU, on rank 0 (other ranks
    get an empty dict): e.g. to write a memcompile checkpoint after distributed training.
    Every rank must call it (it gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
