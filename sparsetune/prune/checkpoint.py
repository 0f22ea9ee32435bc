"""Per-block checkpoints of a prune run, for exact resume after a crash or a kill.

After each finished block the run writes: that block's pruned weights (safetensors), this rank's activations
entering the next block (raw rows), the RNG state, and then `state.json`, which is the commit point. A resumed
run checks that the model, the settings and the calibration tokens are the ones the checkpoint was made with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern
from sparsetune.prune.activations import DiskTensor, read_rows, write_rows
from sparsetune.structure import decoder_layers

FORMAT_VERSION = 1


def _encode_target(t: float | NMPattern) -> str | float:
    return str(t) if isinstance(t, NMPattern) else float(t)


def _decode_target(t: str | float) -> float | NMPattern:
    if isinstance(t, str):
        n, m = t.split(":")
        return NMPattern(int(n), int(m))
    return float(t)


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Checkpointer:
    folder: Path
    identity: dict[str, str]  # model fingerprint, settings hash, calibration hash
    rank: int = 0
    world: int = 1

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def exists(self) -> bool:
        return self.state_file.exists()

    def save(
        self,
        block: int,
        layer: nn.Module | None,
        X: torch.Tensor | DiskTensor,
        targets: list[Any],
        module_info: dict[str, Any] | None = None,
    ) -> None:
        """Record that `block` is finished; X holds the next block's input for this rank. `module_info` (the
        methods' per-module report entries so far) comes back on resume, so the report stays complete. `layer` None:
        the block's weights are streamed and already written to their output shard."""
        self.folder.mkdir(parents=True, exist_ok=True)
        act = self.folder / f"activations-rank{self.rank}-block{block:04d}.bin"
        write_rows(X, act)
        digest = _file_digest(act)
        if self.world > 1:
            torch.distributed.barrier()
        if self.rank == 0:
            if layer is not None:
                weights = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
                save_file(weights, str(self.folder / f"block-{block:04d}.safetensors"))
            torch.save({"torch": torch.get_rng_state()}, self.folder / "rng.pt")
        digests = [digest]
        if self.world > 1:
            digests = [None] * self.world  # type: ignore[list-item]
            torch.distributed.all_gather_object(digests, digest)
        if self.rank == 0:
            state = {
                "format": FORMAT_VERSION,
                "next_block": block + 1,
                **self.identity,
                "world_size": self.world,
                "x_shape": list(X.shape),
                "x_dtype": str(X.dtype),
                "activations": {
                    str(r): [f"activations-rank{r}-block{block:04d}.bin", d] for r, d in enumerate(digests)
                },
                "block_targets": [_encode_target(t) for t in targets],
                "module_info": module_info or {},
            }
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, self.state_file)  # the commit point
        if self.world > 1:
            torch.distributed.barrier()
        for old in self.folder.glob(f"activations-rank{self.rank}-block*.bin"):
            if old != act:
                old.unlink()

    def load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SparsetuneError(
                f"checkpoint {self.state_file} is unreadable ({err}); delete it or use a fresh --checkpoint-dir"
            ) from err
        if state.get("format") != FORMAT_VERSION:
            raise SparsetuneError(f"checkpoint {self.folder} has an unknown format; use a fresh --checkpoint-dir")
        for key, value in self.identity.items():
            if state.get(key) != value:
                what = key.removesuffix("_hash").replace("_", " ")
                raise SparsetuneError(
                    f"checkpoint {self.folder} was made with a different {what}; "
                    "resume with the same model, settings and calibration, or use a fresh --checkpoint-dir"
                )
        if state.get("world_size") != self.world:
            raise SparsetuneError(
                f"checkpoint {self.folder} was made with {state.get('world_size')} processes, this run has "
                f"{self.world}; resume with the same number of processes"
            )
        return state

    def restore(
        self, model: nn.Module, X: torch.Tensor | DiskTensor, streamed: bool = False
    ) -> tuple[int, list[float | NMPattern]]:
        """Load finished blocks into `model` (unless `streamed`: they are in their output shards) and their output
        into X; returns (next block, block targets)."""
        state = self.load_state()
        if list(X.shape) != state["x_shape"] or str(X.dtype) != state["x_dtype"]:
            raise SparsetuneError(f"checkpoint {self.folder} holds activations of another shape; use a fresh dir")

        layers = decoder_layers(model)
        try:
            for i in range(0 if streamed else state["next_block"]):
                weights = load_file(str(self.folder / f"block-{i:04d}.safetensors"))
                current = layers[i].state_dict()
                layers[i].load_state_dict({k: v.to(current[k].device) for k, v in weights.items()})
            name, digest = state["activations"][str(self.rank)]
            path = self.folder / name
            if _file_digest(path) != digest:
                raise ValueError(f"{path} does not match its recorded checksum")
            read_rows(path, X)
            rng = torch.load(self.folder / "rng.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise SparsetuneError(
                f"checkpoint {self.folder} is corrupt ({err}); delete it or use a fresh --checkpoint-dir"
            ) from err
        return int(state["next_block"]), [_decode_target(t) for t in state["block_targets"]]
