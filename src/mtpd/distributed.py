"""The process group of a `torchrun` launch, and the few collectives the trainer needs.

    torchrun --nproc-per-node 2 -m mtpd train ...

torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; we
only join the group it describes (gloo on CPU, nccl on CUDA, each rank on GPU LOCAL_RANK). A process not
started by torchrun never creates a group, and every helper below is then the identity or a no-op, so a
single-process run executes exactly the code it always did.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from mtpd.errors import MtpdError, first_line


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: from the process group, else from torchrun's environment (valid before the group
    exists and after it is gone, e.g. for the CLI's final printout), else 0."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 logs, prints and writes checkpoints; the others train silently."""
    return rank() == 0


def on_main_process(log):
    """`log` on rank 0, a no-op on the others: one copy of every message, not one per process."""
    return log if is_main_process() else _silent


def _silent(*_args, **_kwargs) -> None:
    pass


def this_process_device(device: torch.device) -> torch.device:
    """Under torchrun, plain `cuda` means this process's GPU: number LOCAL_RANK of its node."""
    if not launched_by_torchrun() or device.type != "cuda" or device.index is not None:
        return device
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= gpus:
        raise MtpdError(f"torchrun started more processes on this node than it has GPUs ({gpus}): pass "
                        f"--nproc-per-node {gpus} (one process per GPU)")
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block (nccl for a CUDA device, gloo for CPU); outside torchrun,
    or if the group already exists, do nothing."""
    if not launched_by_torchrun() or is_distributed():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as exc:  # e.g. the rendezvous endpoint cannot be reached
        reason = first_line(exc)
        raise MtpdError(f"cannot join the torchrun process group ({backend}: {reason}): check --rdzv-endpoint / "
                        f"MASTER_ADDR:MASTER_PORT and that every node runs the same torchrun line") from None
    try:
        yield
    except BaseException as exc:
        # Free what the failed block still holds through the traceback (a DDP wrapper, above all) before the
        # group goes: see the note below.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        # destroy_process_group drops the group; its C++ destructor joins gloo's worker threads and must run
        # without the GIL, since a worker may need the GIL to free a finished collective's tensors. Python's
        # reference releases the GIL first, but DDP's C++ reducer does not: if the reducer held the last
        # reference, the process could hang on exit. So callers free their DDP wrapper inside the block.
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """nccl moves CUDA tensors only, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def from_main(value):
    """Rank 0's value (any picklable object) on every rank: decisions that must not diverge, such as when a
    time budget runs out, are taken by one clock."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank holds an equal share of the global batch, so the mean of
    the ranks' means is the mean over the global batch)."""
    if not is_distributed():
        return values
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return dict(zip(values, (total / dist.get_world_size()).tolist()))
