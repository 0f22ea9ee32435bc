"""Record tests/data/stream_reference.json: what the in-memory prune path (before weights were streamed, main
3a686ca) writes for tiny random configs of every tested family. Per output tensor, the sha256 of its raw bytes.

    .venv/bin/python scripts/record_stream_reference.py    # about a minute

tests/prune/test_streaming.py prunes the same dirs with the streamed path and compares every tensor bit for bit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_common import tensor_hashes  # noqa: E402
from stream_cases import CASES, case_dirs  # noqa: E402

from sparsetune.prune.api import run_prune  # noqa: E402
from sparsetune.prune.config import PruneConfig  # noqa: E402


def main() -> None:
    import torch

    torch.set_num_threads(1)
    reference: dict[str, dict[str, dict[str, str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = case_dirs(Path(tmp))
        for case, (family, settings) in CASES.items():
            model_dir, calib = dirs[family]
            out = Path(tmp) / f"out-{case}"
            cfg = PruneConfig(model=str(model_dir), output=str(out), calib=str(calib), **settings)
            run_prune(cfg, show_progress=False)
            reference[case] = tensor_hashes(out)
            print(case, len(reference[case]), flush=True)
    path = ROOT / "tests" / "data" / "stream_reference.json"
    path.write_text(json.dumps(reference, indent=0, sort_keys=True) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
