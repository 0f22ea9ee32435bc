"""Record tests/data/export_stream_reference.json: what the in-memory export path (before export streamed, main
37958d1) writes for tiny pruned models of several families in every compressed format. Per case, the sha256 of
every output file (sparsetune_config.json without its software versions), or the one error it raised; per pruned
input, the sha256 of every tensor (so a changed prune output is told apart from a changed export).

    .venv/bin/python scripts/record_export_stream_reference.py    # about a minute

tests/export/test_streaming.py exports the same inputs with the streamed path and compares every file bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as tests/conftest.py: saved tokenizer configs record it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "tests"))

from export_stream_cases import CASES, file_hashes, pruned_dirs, tensor_hashes  # noqa: E402

from sparsetune.errors import SparsetuneError  # noqa: E402
from sparsetune.export.config import ExportConfig  # noqa: E402
from sparsetune.export.writer import run_export  # noqa: E402


def main() -> None:
    import torch

    torch.set_num_threads(1)
    reference: dict = {"inputs": {}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = pruned_dirs(Path(tmp))
        for name, folder in dirs.items():
            reference["inputs"][name] = tensor_hashes(folder)
        for case, (name, settings) in CASES.items():
            out = Path(tmp) / f"out-{case}"
            try:
                run_export(ExportConfig(model=str(dirs[name]), output=str(out), **settings))
                reference["cases"][case] = {"files": file_hashes(out)}
            except SparsetuneError as err:
                reference["cases"][case] = {"error": str(err)}
            print(case, reference["cases"][case].get("error") or len(reference["cases"][case]["files"]), flush=True)
    path = ROOT / "tests" / "data" / "export_stream_reference.json"
    path.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
