"""`seft --method dst` (also accepted as `seft` for now): whole-weight drop-and-grow on the pruned model.

Trains only the active weights (as masked-ft); every `update_interval` steps drops the active weights with the
smallest `drop_criterion` score (default |w| * ||x||; REFERENCE.md's accumulated update is one option) and grows as
many inactive positions with the largest dense gradient (summed over the last `grow_batches` training batches at
that step only). Grown weights start at 0 with fresh optimizer state. N:M patterns drop and grow inside each group.

Multi-process: growth scores are all-reduced, every rank makes the same choice, verified by a digest after every
update.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsetune.train import topology
from sparsetune.train.common import drop_fraction_at
from sparsetune.train.masked_ft import MaskedFineTuning


def default_update_interval(kind: str) -> int:
    return 60 if kind == "text" else 10


class DropAndGrow(MaskedFineTuning):
    def __init__(self, run: Any) -> None:
        self.track_updates = run.cfg.drop_criterion == "update"
        super().__init__(run)
        self.interval = run.cfg.update_interval or default_update_interval(run.train_data.kind)

    def topology_due(self, step: int) -> bool:
        return step % self.interval == 0

    def topology_update(self, step: int) -> dict[str, Any]:
        """Drop the active weights with the smallest `--drop-criterion` score, grow where the dense gradient
        (accumulated over the grow batches) is largest. Choices are made per module as backward delivers its
        gradient, and applied once the backward pass is over."""
        run, cfg = self.run, self.run.cfg
        fraction = drop_fraction_at(step, cfg)
        pattern = run.start.pattern
        swaps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def choose(name: str, grad: torch.Tensor, norms: torch.Tensor | None) -> None:
            weight = self.sparse[name]
            active = weight.active
            k = min(int(fraction * active.numel()), active.numel(), weight.param.numel() - active.numel())
            if k == 0:
                return
            grad = grad.view(-1)
            score = drop_score(cfg.drop_criterion, weight, grad, self.optimizer, norms)
            if pattern is not None:
                swaps[name] = topology.nm_drop_grow(active, score, grad.abs(), k, pattern, weight.param.shape)
            else:
                swaps[name] = (topology.drop(score, k), topology.grow(grad.abs(), k, exclude=active))

        with self.optimizer.dense_grads():
            weights = {name: w.param for name, w in self.sparse.items()}
            run.growth_gradients(step, weights, choose, input_norms=cfg.drop_criterion == "wanda")
        stats = {"step": step, "drop_fraction": fraction, "dropped": 0, "grown": 0, "regrown_previously_pruned": 0}
        for name in self.sparse:  # a fixed order, the same on every rank
            if name not in swaps:
                continue
            drop_slots, grow_pos = swaps[name]
            self.optimizer.swap_entries(name, drop_slots, grow_pos)
            stats["dropped"] += int(drop_slots.numel())
            stats["grown"] += int(grow_pos.numel())
            stats["regrown_previously_pruned"] += int((~run.start.masks[name].view(-1)[grow_pos]).sum())
        self.optimizer.reset_tracking()
        topology.verify_same_across_ranks({n: w.index for n, w in self.sparse.items()})
        return stats


def drop_score(
    criterion: str, weight: Any, grad: torch.Tensor, optimizer: Any, input_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Per active slot: how much the model would lose if the weight went to zero (drop the smallest).

    sensitivity |w * dL/dw| is the first-order loss change of zeroing w (the score SEFT re-prunes with);
    wanda |w| * ||x_j|| is the output error of zeroing w (the score that pruned the model; `input_norms` holds the
    summed x_j**2 of the grow batches); update, the accumulated update since the last topology change, is the
    criterion as REFERENCE.md states it; on a pretrained model it ignores |w| and zeroes large weights that merely
    moved little (see the README).
    """
    if criterion == "update":
        return optimizer.tracked_update(weight.name).abs()
    active = weight.active
    values = weight.param.detach().view(-1)[active].float()
    if criterion == "magnitude":
        return values.abs()
    if criterion == "wanda":
        assert input_norms is not None
        return values.abs() * input_norms.sqrt()[active % weight.param.shape[1]]
    return (values * grad[active].float()).abs()
