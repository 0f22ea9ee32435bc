"""A prune run over streamed weights: each block is read from the input checkpoint for its turn, pruned, written to
its own output shard and freed, so the run holds one block (plus the embeddings and the calibration activations)
whatever the model's size. The engine sees it through `engine.BlockWeights`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from sparsetune import masks
from sparsetune.streaming import ShardWriter, StreamedModel

STATS_FILE = "block-{index:05d}-stats.json"  # beside a block's shard: its sparsity, for the report after a resume


class PruneStream:
    """`engine.BlockWeights` for a prune run. Records each block's target sparsity before (first load) and after
    (commit), and on the writing rank writes the committed block to shard index+1 of `writer`."""

    def __init__(
        self,
        streamed: StreamedModel,
        targets: list[list[tuple[str, Any]]],
        writer: ShardWriter | None,
        body_shard: int | None = None,
    ):
        self.streamed, self.targets, self.writer, self.body_shard = streamed, targets, writer, body_shard
        self.before: dict[int, tuple[int, int]] = {}  # block -> (zeros, numel) of its targets before pruning
        self.after: dict[int, dict[str, Any]] = {}  # block -> masks.sparsity_stats of its targets after
        self.peak_block_bytes = 0
        self.embedding_sparsity: float | None = None

    def blocks_start(self) -> None:
        """Before the first block is read (the calibration inputs are captured by then): write everything outside
        the blocks but a separate head to its shard, and free the embedding table for the rest of the run."""
        emb = self.streamed.model.get_input_embeddings().weight
        self.embedding_sparsity = masks.tensor_sparsity(emb.detach())
        if self.writer is not None and self.body_shard is not None:
            self.writer.write(self.body_shard, self.streamed.rest_state("body"))
        self.streamed.release_input_embeddings()

    def load(self, index: int, device: torch.device) -> None:
        if self.embedding_sparsity is None:
            self.blocks_start()
        layer = self.streamed.load_block(index, device)
        block_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        self.peak_block_bytes = max(self.peak_block_bytes, block_bytes)
        if index not in self.before:
            weights = [t.weight() for _, t in self.targets[index]]
            self.before[index] = (sum(masks.zero_count(w) for w in weights), sum(w.numel() for w in weights))

    def commit(self, index: int) -> None:
        stats = masks.sparsity_stats({name: t.weight() for name, t in self.targets[index]})
        self.after[index] = stats
        if self.writer is not None:
            self.writer.write(index + 1, self.streamed.block_state(index))
            record = {"before": self.before.get(index), "after": stats}
            path = self.writer.folder / STATS_FILE.format(index=index)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)

    def release(self, index: int) -> None:
        self.streamed.release_block(index)

    def restore_finished(self, n_blocks: int) -> None:
        """After a resume: the finished blocks' statistics from the files written beside their shards."""
        assert self.writer is not None
        for index in range(n_blocks):
            path = self.writer.folder / STATS_FILE.format(index=index)
            if index not in self.after and path.is_file():
                record = json.loads(path.read_text())
                self.before[index] = tuple(record["before"])  # type: ignore[assignment]
                self.after[index] = record["after"]

    def sparsity_before(self) -> float:
        zeros = sum(z for z, _ in self.before.values())
        return zeros / max(1, sum(n for _, n in self.before.values()))

    def stats_files(self) -> list[Path]:
        return sorted(self.writer.folder.glob("block-*-stats.json")) if self.writer is not None else []
