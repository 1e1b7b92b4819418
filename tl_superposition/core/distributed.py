"""Data-parallel runs with ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node N -m tl_superposition COMMAND ...`` starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment;
:func:`init` joins them into one process group (NCCL on GPUs, gloo on CPUs) and gives each
process its device (``cuda:LOCAL_RANK``). Without those variables a run is a single process:
:func:`init` returns rank 0 of 1 and creates no process group, so it costs nothing.

The commands split their work themselves (shard ``k`` or batch ``k`` to rank ``k mod N``, or
each rank's rows of a batch) and meet through the helpers here: :func:`barrier`, gathers of
objects and rows, reductions over ranks; training wraps its module in
``torch.nn.parallel.DistributedDataParallel``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run.

    Attributes:
        rank: this process (0 .. size - 1); rank 0 writes the shared files.
        size: processes in the run (1: no process group).
        local_rank: this process on its node (its GPU index).
        backend: ``"nccl"``, ``"gloo"`` or None (single process).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes take part."""
        return self.size > 1


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None = None) -> World:
    """Join the process group ``torchrun`` set up (once; later calls return the same world).

    Args:
        device: the device the command was asked to use; ``"cuda"`` (or None with CUDA
            available) picks NCCL and ``cuda:LOCAL_RANK``, anything else gloo.

    Raises:
        RuntimeError: NCCL asked for but fewer GPUs than local processes.
    """
    if not launched():
        return World()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda and local >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs: start at most one "
            "process per GPU (torchrun --nproc-per-node)"
        )
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def current() -> World:
    """The world of an already initialised run (rank 0 of 1 when none is)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return World(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def device_of(world: World, device: str) -> str:
    """The device this rank runs on: ``cuda:LOCAL_RANK`` for a ``cuda`` run, else ``device``."""
    if world.distributed and str(device) == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def barrier(world: World) -> None:
    """Wait for every rank (nothing in a single process)."""
    if world.distributed:
        dist.barrier()


def gather_objects(obj: T, world: World) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: T, world: World) -> list[T]:
    """Every rank's ``obj`` in rank order on rank 0 (an empty list on the others; ``[obj]`` in
    a single process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out if out is not None else []


def gather_rows(t: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``t`` (same shape on every rank) concatenated along dim 0 in rank order:
    the whole batch when each rank holds its :func:`~tl_superposition.qk.source.part_rows`."""
    if not world.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def sum_over_ranks(t: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise sum of ``t`` over ranks (``t`` itself in a single process)."""
    if not world.distributed:
        return t
    out = _for_backend(t.detach().clone())
    dist.all_reduce(out)
    return out.to(t.device)


def any_rank(mask: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise OR of a boolean ``mask`` over ranks."""
    if not world.distributed:
        return mask
    flag = _for_backend(mask.to(torch.int32))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.bool().to(mask.device)


def mean_over_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    """The mean over ranks of each value (float64; the values as given in a single process)."""
    if not world.distributed:
        return values
    t = _for_backend(torch.tensor(list(values.values()), dtype=torch.float64))
    dist.all_reduce(t)
    return dict(zip(values, (t / world.size).tolist(), strict=True))


def _for_backend(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the device the process group's collectives take (NCCL: this rank's GPU)."""
    return t.cuda() if dist.get_backend() == "nccl" else t


def broadcast_object(obj: T, world: World) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close(world: World) -> None:
    """Leave the process group at the end of a run."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
