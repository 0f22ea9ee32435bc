"""Where large CPU tensors live during training (`--cpu-block-cache-mb`, on by default for `seft`).

glibc serves an allocation from its heap unless it is at least the mmap threshold, which starts at 128 KB and rises
to the size of the largest mapped chunk freed so far (up to 32 MB). A training step allocates and frees hundreds of
hidden-state and MLP tensors of 4-20 MB, so after the first step the threshold sits above them and the heap serves
them. Freed, they stay resident, fragmented around the tensors that live on (the checkpointed blocks' inputs, the
gradients): on the bundled model about 1.3 GB of seft's 3 GB peak. A lower fixed threshold (glibc's
`mmap_threshold` tunable) hands them back, but maps and faults every page anew: 1.5-1.8x the step.

The block cache (`cpu_block_cache.cpp`) is torch's CPU allocator for the run instead: blocks of at least
`min_mb` MB are anonymous mappings of their own, and a freed one waits for the next allocation of the same size.
A step allocates the same shapes block after block, so nearly every large allocation is served from the cache:
no heap to fragment, no page faults after the first step. What it holds beyond the live tensors is, per size, the
most blocks of that size ever live at once. Torch has no CPU caching allocator on desktop builds (its
CPUCachingAllocator is the mobile one), so this is compiled here, once per torch version, with the system's C++
compiler; without one the run goes on with glibc's heap, logs a warning, and its report's `cpu_block_cache` is
null.

Process-wide: a training run installs it as it starts and stops it after its last step (the cached blocks are
handed back before the model is merged and saved, and the ones still live as they are freed).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sparsetune.loading import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_block_cache.cpp")
STATS = ("hits", "misses", "cached_bytes", "mapped_bytes", "min_bytes")

_library: ctypes.CDLL | None = None


def _compile() -> Path | None:
    """The compiled library for this torch (built once, atomically renamed into place); None without a compiler."""
    import torch
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return None
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch.compiled_with_cxx11_abi())
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{torch.__version__}|{torch_lib}|{abi}|{compiler}|{sys.platform}".encode()
    ).hexdigest()[:16]
    target = cache_dir() / "cpu_block_cache" / f"cpu_block_cache-{key}.so"  # beside the converted checkpoints
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        includes = [f"-I{p}" for p in include_paths()]
        cmd = [
            compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
            str(SOURCE), "-o", str(built), f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            log.debug("building the CPU block cache failed:\n%s", result.stderr)
            return None
        os.replace(built, target)  # another process may have built the same file meanwhile: same bytes
    return target


def install_block_cache(min_mb: float) -> bool:
    """Make the block cache torch's CPU allocator for blocks of at least `min_mb` MB. True when installed (now or
    before); False for `min_mb` 0 or where it cannot be built (no C++ compiler, not Linux)."""
    global _library
    if min_mb <= 0 or not sys.platform.startswith("linux"):
        return False
    if _library is None:
        path = _compile()
        if path is None:
            log.warning("the CPU block cache could not be built (no C++ compiler?): freed tensors stay in glibc's heap")
            return False
        _library = ctypes.CDLL(str(path))
        _library.sparsetune_block_cache_install.argtypes = [ctypes.c_size_t]
        _library.sparsetune_block_cache_release.restype = ctypes.c_size_t
    return bool(_library.sparsetune_block_cache_install(int(min_mb * 2**20)))


def release_cached_blocks() -> int:
    """Unmap the cached free blocks and go on caching (e.g. after loading, whose block sizes training does not
    reuse); the bytes handed back."""
    return int(_library.sparsetune_block_cache_release()) if _library is not None else 0


def stop_block_cache() -> dict[str, int] | None:
    """End caching: unmap the cached blocks now and the live ones as they are freed; new allocations go to c10's
    own. Returns the counters as they were before it stopped (None when the cache was not installed)."""
    if _library is None:
        return None
    stats = block_cache_stats()
    _library.sparsetune_block_cache_install(0)
    _library.sparsetune_block_cache_release()
    return stats


def block_cache_stats() -> dict[str, int] | None:
    """hits, misses, cached_bytes, mapped_bytes, min_bytes; None when not installed."""
    if _library is None:
        return None
    out = (ctypes.c_uint64 * len(STATS))()
    _library.sparsetune_block_cache_stats(out)
    return dict(zip(STATS, (int(v) for v in out), strict=True))
