"""Multi-process runs through accelerate (`accelerate launch` / `torchrun`): rank, world size, device, and every
collective operation the package uses (sums, means, shares, barriers, agreement checks), in this one module.

accelerate's utilities (`PartialState`, `accelerate.utils.reduce` / `gather_object`, `split_between_processes`) do
the work where they fit. Two operations are hand-written here, each saying why: an in-place sum (accelerate's
`reduce` returns a copy, which would double a SparseGPT Hessian or a dense gradient) and a mean over a flat bucket of
many gradients in one call (accelerate's `reduce` issues one all-reduce per tensor). In one process every operation
is a no-op that never imports accelerate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from sparsetune.devices import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        barrier()

    def share(self, items: T) -> T:
        """This rank's contiguous share of a list or tensor (dim 0): the first ranks take any remainder."""
        if self.world == 1:
            return items
        from accelerate import PartialState

        with PartialState().split_between_processes(items) as mine:
            return mine

    def shard(self, samples: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the calibration samples (dim 0)."""
        return self.share(samples)


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def dist_context(device: str = "auto") -> DistContext:
    """Single process unless started by a launcher; then join the process group through accelerate."""
    if not launched_distributed():
        return DistContext(0, 1, resolve_device(device))
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") in ("1", "true")
    state = PartialState(cpu=cpu)
    return DistContext(state.process_index, state.num_processes, state.device)


def world_size() -> int:
    """Processes in the joined group (1 when none was joined)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over processes: `t` itself in one process, else a new tensor (use the return value)."""
    if world_size() == 1:
        return t
    from accelerate.utils import reduce

    return reduce(t, reduction="sum")


def sum_in_place(tree: Any) -> Any:
    """Sum every tensor of a (nested tuple/list) tree over processes, in place; None leaves stay None.

    Hand-written: accelerate's `reduce` copies each tensor (twice the memory of a SparseGPT Hessian or of a dense
    gradient) and refuses None leaves (magnitude pruning keeps no statistics)."""
    if world_size() == 1:
        return tree
    if isinstance(tree, (tuple, list)):
        for part in tree:
            sum_in_place(part)
    elif isinstance(tree, torch.Tensor):
        torch.distributed.all_reduce(tree, op=torch.distributed.ReduceOp.SUM)
    return tree


def mean_in_place(tensors: list[torch.Tensor]) -> None:
    """Average the tensors over processes, in place, with one all-reduce of a flat fp32 bucket.

    Hand-written: accelerate's `reduce` on a list issues one collective per tensor, and a training step averages the
    gradients of hundreds of tensors (every sparse weight's compact gradient, every LoRA or dense parameter)."""
    world = world_size()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat.div_(world)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def same_on_every_process(digest: bytes) -> bool:
    """Whether every process holds the same `digest` (True in one process)."""
    if world_size() == 1:
        return True
    from accelerate.utils import gather_object

    gathered = gather_object([digest])
    return all(d == digest for d in gathered)
