"""What a `seft --no-merge` output dir is: its adapter file's name, and how to tell such a dir.

Torch-free: the loader asks about every local dir it loads (`sparsetune.input_formats`), and the CLI imports it.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_FILE = "seft_adapter.safetensors"


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a `seft --no-merge` output: an adapter (whose config names its base) and no model."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_FILE).is_file() and not (path / "config.json").exists()
