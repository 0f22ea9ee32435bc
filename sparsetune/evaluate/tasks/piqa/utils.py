"""PIQA's original release keeps labels apart from the questions; join them into one validation split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_piqa(data_file: str, labels_file: str, **_: Any) -> Any:
    """DatasetDict {"validation": rows of goal, sol1, sol2, label} from valid.jsonl + valid-labels.lst.

    lm-eval calls this as `custom_dataset` with the task's metadata and dataset_kwargs as keyword arguments,
    so unrelated keys (such as `version`) are accepted and ignored.
    """
    import datasets

    rows = [json.loads(line) for line in Path(data_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [int(line) for line in Path(labels_file).read_text(encoding="utf-8").split()]
    if len(rows) != len(labels):
        raise ValueError(f"{data_file} has {len(rows)} questions but {labels_file} has {len(labels)} labels")
    for row, label in zip(rows, labels, strict=True):
        row["label"] = label
    columns = {key: [row[key] for row in rows] for key in ("goal", "sol1", "sol2", "label")}
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict(columns)})
