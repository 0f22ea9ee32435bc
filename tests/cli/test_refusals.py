"""Bad input is refused before the library is imported: a whole `sparsetune` process that refuses a recipe, an
output path or a data file prints one `error:` line, exits 2, writes nothing and imports no torch & co.

Each case runs `python -X importtime -m sparsetune ...`, whose stderr lists every module the process imported
besides the command's own lines. How long a refusal takes is measured by scripts/bench_refusals.py, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "datasets", "lm_eval", "accelerate", "peft", "safetensors", "huggingface_hub")

# Lists of 10 aliases of lists of 10 ..., six levels deep: a few hundred bytes. Anchor a_i's list expands to
# 1 + 10 * (a_{i-1}'s) nodes, 11 for a0 up to 11,111,111 for a6; the seven anchors and the stage's *a6 expand to
# 12,345,677 + 11,111,111 nodes, of which the file writes 17 (the lists and a0's items).
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7)
)
BOMB_ERROR = "its aliases (*name) expand to 23,456,771 nodes more than the file holds"


def sparsetune(*args: str | Path, cwd: Path) -> tuple[int, list[str], set[str]]:
    """(exit code, the command's stderr lines, the top-level packages the whole process imported)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sparsetune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    lines = proc.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    return proc.returncode, [line for line in lines if not line.startswith("import time:")], imported


def write_recipe(path: Path, stage: str, bomb: bool = True) -> Path:
    path.write_text((ALIAS_BOMB if bomb else "") + f"stages:\n  - {stage}\n")
    return path


def binary_file(path: Path) -> Path:
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    return path


def under_a_file(tmp: Path) -> Path:
    return binary_file(tmp / "f") / "out"


CASES = {
    "run: alias bomb": (
        lambda tmp: ["run", write_recipe(tmp / "r.yaml", "prune: {model: smollm2, targets: *a6}"), "-o", tmp / "out"],
        BOMB_ERROR,
    ),
    "prune --recipe: alias bomb": (
        lambda tmp: ["prune", "smollm2", "--recipe", write_recipe(tmp / "r.yaml", "prune: {ignore: *a6}"), "-o", tmp],
        BOMB_ERROR,
    ),
    "prune: -o under a regular file": (
        lambda tmp: ["prune", "smollm2", "-o", under_a_file(tmp)],
        "f is a file, not a directory; choose another -o",
    ),
    "run: -o under a regular file": (
        lambda tmp: [
            "run",
            write_recipe(tmp / "r.yaml", "prune: {model: smollm2}", bomb=False),
            "-o",
            under_a_file(tmp),
        ],
        "f is a file, not a directory; choose another -o",
    ),
    "prune: existing output": (
        lambda tmp: ["prune", "smollm2", "-o", tmp],
        "already exists; pass --overwrite or choose another --output",
    ),
    "prune: binary --calib": (
        lambda tmp: ["prune", "smollm2", "--calib", binary_file(tmp / "ls"), "-o", tmp / "out"],
        "ls; use .txt, .jsonl, .json or .parquet",
    ),
    "prune: binary .txt --calib": (
        lambda tmp: ["prune", "smollm2", "--calib", binary_file(tmp / "c.txt"), "-o", tmp / "out"],
        "c.txt is a binary file, not text",
    ),
    "sweep: binary --calib": (
        lambda tmp: ["sweep", "smollm2", "--calib", binary_file(tmp / "c.jsonl"), "-o", tmp / "out"],
        "c.jsonl is a binary file, not text",
    ),
    "seft: binary --data": (
        lambda tmp: ["seft", "pruned", "--data", binary_file(tmp / "d.jsonl"), "-o", tmp / "out"],
        "d.jsonl is a binary file, not text",
    ),
    "smet-pretrain: missing --data": (
        lambda tmp: ["smet-pretrain", "--data", tmp / "none.txt", "-o", tmp / "out"],
        "none.txt' not found; pass an existing file",
    ),
    "eval: binary --ppl": (
        lambda tmp: ["eval", "smollm2", "--ppl", binary_file(tmp / "p.txt")],
        "p.txt is a binary file, not text",
    ),
    "eval: existing output": (
        lambda tmp: ["eval", "smollm2", "--ppl", "wikitext2", "-o", tmp],
        "already exists; pass --overwrite or choose another --output",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusals_import_no_ml_stack_and_write_nothing(case, tmp_path):
    make_args, expected = CASES[case]
    args = make_args(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, stderr, imported = sparsetune(*args, cwd=tmp_path)
    assert code == 2, stderr
    assert len(stderr) == 1 and stderr[0].startswith("error: ") and expected in stderr[0], stderr
    assert sorted(tmp_path.rglob("*")) == before
    assert "sparsetune" in imported and "pydantic" in imported  # the import listing works
    assert sorted(imported & set(HEAVY)) == []


def test_the_binary_calib_is_refused_only_when_pruning_reads_it(tmp_path):
    """Magnitude pruning reads no calibration data, so a bad --calib is no reason to refuse it: the run gets past
    the checks (and then fails to find the model, in the library)."""
    calib = binary_file(tmp_path / "c.txt")
    code, stderr, imported = sparsetune(
        "prune", tmp_path / "no-model", "--method", "magnitude", "--calib", calib, "-o", tmp_path / "out", cwd=tmp_path
    )
    assert code == 2 and "is a binary file" not in "\n".join(stderr) and "not found" in stderr[-1], stderr
    assert "torch" in imported
