"""Running on several processes with PyTorch's own runtime (``torchrun``).

Each rank rolls out and scores its shard of the step's images; gradients are all-reduced
by ``DistributedDataParallel`` (or sharded by FSDP2's ``fully_shard``); metrics are
reduced across ranks; only rank 0 writes checkpoints and logs. gloo on CPU, nccl on GPU.

A single process is a world of size 1: every helper here is then a no-op, so the
trainer has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from attrs import frozen

from vlrm.errors import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@frozen
class World:
    """Where this process stands.

    Attributes:
        rank: This process's index, 0 .. size - 1.
        size: Number of processes.
        local_rank: Index on this machine (picks the GPU).
        device: The device this rank computes on.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that writes checkpoints and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of ``items`` (its length must divide evenly)."""
        if len(items) % self.size:
            raise ConfigError(f"{len(items)} items cannot be split evenly over {self.size} "
                              "processes: make trainer.images_per_step a multiple of the "
                              "number of processes")
        per = len(items) // self.size
        return list(items[self.rank * per:(self.rank + 1) * per])

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks (a copy; the input is unchanged)."""
        if not self.distributed:
            return tensor.clone()
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order (equal shapes)."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def reduce_metrics(self, metrics: dict[str, float], summed: Sequence[str] = ()) -> dict[str, float]:
        """Metrics over all ranks: keys in ``summed`` are added, the rest averaged.

        Every rank must pass the same keys (ranks missing a key count it as 0).
        """
        if not self.distributed:
            return dict(metrics)
        keys = sorted(self.all_gather_object(sorted(metrics))[0])
        values = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64)
        values = self.all_reduce(values)
        return {k: v if k in summed else v / self.size for k, v in zip(keys, values.tolist())}

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, built by vlrm itself), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def use_local_device() -> None:
    """Make ``cuda`` mean this rank's GPU (``LOCAL_RANK``) before any model is built, so that
    a config saying ``device: cuda`` puts each rank's copy on its own GPU. No-op without CUDA."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(_default_device(int(os.environ["LOCAL_RANK"])))


def from_environment() -> World:
    """The world torchrun describes in the environment, or a single process.

    Initialises the default process group the first time it is called under torchrun:
    gloo for CPU tensors, plus nccl for CUDA tensors when there is a GPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=_default_device(0))
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start several "
                          "processes with torchrun (torchrun --nproc_per_node=N -m vlrm.cli ...)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = _default_device(local_rank)
    if not dist.is_initialized():
        backend = "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
            backend = "cpu:gloo,cuda:nccl"  # metrics and seeds are CPU tensors
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process (from the environment alone)."""
    return os.environ.get("RANK", "0") == "0"


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def shutdown(world: World, ok: bool = True) -> None:
    """Leave the process group. After a successful run, a barrier first: without it gloo
    can abort rank 0 while a peer is still tearing down ("terminate called without an
    active exception"). After a failure, no barrier (the peers may be waiting in another
    collective): the process exits and torchrun stops the others."""
    if world.distributed and dist.is_initialized() and ok:
        dist.barrier()
        dist.destroy_process_group()


def sample_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """Seeds of images ``first .. first + count - 1`` of step ``step``: a pure function of
    the run's seed and the image's place in the step, so any split of the step's images over
    processes samples the same captions.

    Returns:
        ``count`` ints in [0, 2**63).
    """
    return [((seed * 1_000_003 + step) * 65_537 + first + i) % (2**63) for i in range(count)]
