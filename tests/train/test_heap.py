"""The CPU block cache (`--cpu-block-cache-mb`, seft's default 1): a freed large CPU tensor's block is reused by the
next allocation of the same size, results are unchanged bit for bit, and stopping it hands the blocks back."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_weights, make_pruned, write_text
from helpers import seft_settings as tiny_seft_settings

from sparsetune.train import heap
from sparsetune.train.seft import FinetuneRun
from sparsetune.train.seft_config import SeftConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache():
    if not heap.install_block_cache(1):
        pytest.skip("no C++ compiler to build the block cache with")
    yield heap
    heap.stop_block_cache()


def test_a_freed_block_is_reused_at_the_same_size_only(cache):
    before = cache.block_cache_stats()
    first = torch.empty(2**20, dtype=torch.float32)  # 4 MiB
    ptr = first.data_ptr()
    del first
    again = torch.empty(2**20, dtype=torch.float32)
    assert again.data_ptr() == ptr  # the same block, from the cache
    other = torch.empty(2**20 + 4096, dtype=torch.float32)  # another size: a block of its own
    assert other.data_ptr() != ptr
    small = torch.empty(1024)  # below the 1 MB threshold: c10's own allocation, not counted
    after = cache.block_cache_stats()
    assert after["hits"] - before["hits"] == 1
    assert after["misses"] - before["misses"] == 2
    assert after["min_bytes"] == 2**20
    del again, other, small


def test_stopping_hands_cached_and_later_freed_blocks_back(cache):
    kept = torch.ones(2**20)  # live when the cache stops
    freed = torch.ones(2**20 + 1024)
    del freed
    stats = cache.block_cache_stats()
    assert stats["cached_bytes"] >= 4 * 2**20 + 4096  # the freed block waits in the cache
    mapped = stats["mapped_bytes"]
    cache.stop_block_cache()
    stopped = cache.block_cache_stats()
    assert stopped["cached_bytes"] == 0 and stopped["min_bytes"] == 0
    assert stopped["mapped_bytes"] == mapped - stats["cached_bytes"]
    size = (4 * 2**20 + 4095) // 4096 * 4096
    del kept  # unmapped when freed: nothing is cached any more
    assert cache.block_cache_stats()["mapped_bytes"] == stopped["mapped_bytes"] - size
    assert torch.ones(2**20).sum() == 2**20  # new tensors come from c10's allocator again


def test_zero_installs_nothing():
    assert heap.install_block_cache(0) is False


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("heap")
    return {"pruned": make_pruned(root), "text": write_text(root / "t.txt")}


@pytest.mark.parametrize("method", ["seft", "masked-ft"])
def test_training_is_the_same_bit_for_bit_with_the_cache(inputs, tmp_path, method):
    """A 1 KB threshold puts nearly every tensor of the tiny model through the cache."""
    results = {}
    for mb in (1 / 1024, 0):
        out = tmp_path / f"cache-{mb}"
        settings = tiny_seft_settings(inputs["pruned"], inputs["text"], out, method=method, cpu_block_cache_mb=mb)
        report = FinetuneRun(SeftConfig(**settings), show_progress=False).run()
        log = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        results[mb] = (report, log, load_weights(out, "*.safetensors"))
    (on, on_losses, on_weights), (off, off_losses, off_weights) = results[1 / 1024], results[0]
    assert on_losses == off_losses
    assert on_weights.keys() == off_weights.keys()
    for name, tensor in on_weights.items():
        assert torch.equal(tensor, off_weights[name]), name
    counts = on["summary"]["cpu_block_cache"]
    assert counts["hits"] > 10 * counts["misses"]  # the same shapes step after step
    assert counts["min_bytes"] == 1024
    assert off["summary"]["cpu_block_cache"] is None
    assert heap.block_cache_stats()["min_bytes"] == 0  # the run stopped the cache it installed


def test_without_a_compiler_the_run_goes_on_with_glibc_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(heap, "_library", None)
    monkeypatch.setenv("SPARSETUNE_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(heap.shutil, "which", lambda _name: None)
    with caplog.at_level("WARNING", logger="sparsetune.train.heap"):
        assert heap.install_block_cache(1) is False
    assert "could not be built" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_releasing_the_cached_blocks_keeps_caching(cache):
    freed = torch.ones(2**20 + 2048)
    del freed
    cached = cache.block_cache_stats()["cached_bytes"]
    assert cached > 0
    assert cache.release_cached_blocks() == cached
    assert cache.block_cache_stats()["cached_bytes"] == 0
    again = torch.ones(2**20 + 2048)
    del again  # still caching: the block waits for the next tensor of its size
    assert cache.block_cache_stats()["cached_bytes"] == (4 * 2**20 + 8192 + 4095) // 4096 * 4096
    assert cache.block_cache_stats()["min_bytes"] == 2**20
