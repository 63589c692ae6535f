"""How the model is spread over the ranks of a torchrun launch, and how its state is saved and restored then.

Two strategies with one small interface, so the trainer never asks which one it has:

    Replicated    every rank holds the whole model; DDP averages the gradients after each backward
                  (in a single process: the model itself, no wrapper, no communication)
    FullySharded  FSDP2 (`fully_shard`): parameters, gradients and optimizer state are split over the ranks
                  and gathered block by block for compute, for models that do not fit on one device

Both train the same function of the global batch; checkpoints always hold the whole, unsharded model in the
usual single-file format, so any checkpoint resumes or evaluates anywhere. The optimizer state is stored in
the layout of the strategy that wrote it (index-keyed for Replicated, parameter-name-keyed for FullySharded),
so a run resumes with the strategy it was started with.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from mtpd.checkpoint import load_weights
from mtpd.distributed import is_distributed, is_main_process, launched_by_torchrun
from mtpd.errors import MtpdError
from mtpd.model import MTPModel
from mtpd.model.decoder import Block, Decoder

NO_FSDP_FOR_HF = ("--fsdp shards mtpd's built-in decoder; heads on a Hugging Face model train with DDP (the frozen "
                  "model is replicated): drop --fsdp")


def require_torchrun_for_fsdp(fsdp: bool) -> None:
    """Checked before any work: FSDP2 needs the processes of a torchrun launch to shard over."""
    if fsdp and not launched_by_torchrun():
        raise MtpdError("--fsdp shards the model over the processes of a torchrun launch, and this is a single "
                        "process: launch with `torchrun --nproc-per-node N -m mtpd train ... --fsdp`, or drop --fsdp")


class Replicated:
    name = "replicated"

    def __init__(self, model: MTPModel, device: torch.device):
        self.model = model
        # forward_sync_buffers=False: the only buffers are constant rotary tables, the same on every rank, so
        # they are not re-broadcast before every forward.
        self.module: nn.Module = model
        if is_distributed():
            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  forward_sync_buffers=False)

    def gradient_sync(self, enabled: bool):
        """Skip the all-reduce on the micro-batches before the last one of a gradient-accumulation step."""
        if enabled or self.module is self.model:
            return nullcontext()
        return self.module.no_sync()

    def model_to_save(self) -> MTPModel | None:
        return self.model

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def load_weights(self, checkpoint: Path, device: torch.device) -> None:
        load_weights(self.model, checkpoint, device)


class FullySharded:
    name = "fsdp"
    _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def __init__(self, model: MTPModel, device: torch.device):
        require_torchrun_for_fsdp(True)
        if not isinstance(model.main, Decoder):
            raise MtpdError(NO_FSDP_FOR_HF)
        # One FSDP unit per transformer block (main model and heads); the embedding, the shared output
        # projection and the small head layers stay in the root unit, which keeps the tied weights together.
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block)
        fully_shard(model)  # replaces the parameters by sharded ones in place: self.model is now sharded
        self.model = self.module = model

    @contextmanager
    def gradient_sync(self, enabled: bool):
        self.model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def model_to_save(self) -> MTPModel | None:
        """The whole model, gathered to rank 0's CPU (a collective: every rank calls it); None on the others."""
        full = get_model_state_dict(self.model, options=self._FULL)
        if not is_main_process():
            return None
        copy = MTPModel(self.model.cfg)
        copy.load_state_dict(full)
        return copy

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return get_optimizer_state_dict(self.model, optimizer, options=self._FULL)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def load_weights(self, checkpoint: Path, device: torch.device) -> None:
        copy = MTPModel(self.model.cfg)
        load_weights(copy, checkpoint)  # the file stores tied weights once; the copy's state_dict names both
        set_model_state_dict(self.model, copy.state_dict(), options=StateDictOptions(full_state_dict=True))


def parallelize(model: MTPModel, device: torch.device, fsdp: bool = False) -> Replicated | FullySharded:
    """Call after setting requires_grad (DDP registers hooks for the parameters that train at this moment)."""
    return FullySharded(model, device) if fsdp else Replicated(model, device)
