"""Multi-process runs through accelerate (`accelerate launch` / `torchrun`): rank, world size, device, barriers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def shard(self, samples: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the calibration samples (dim 0)."""
        return samples.tensor_split(self.world)[self.rank] if self.world > 1 else samples


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def dist_context(device: str = "auto") -> DistContext:
    """Single process unless started by a launcher; then join the process group through accelerate."""
    if not launched_distributed():
        from sparsetune.models import resolve_device

        return DistContext(0, 1, resolve_device(device))
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") in ("1", "true")
    state = PartialState(cpu=cpu)
    return DistContext(state.process_index, state.num_processes, state.device)
