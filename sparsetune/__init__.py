"""sparsetune: prune, repair, pretrain, evaluate and export sparse LLMs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, **kwargs: Any) -> Any:
    """Load any sparsetune output dir (plain HF or an exported sparse format) as a transformers model."""
    from sparsetune.models import load_model

    model, _ = load_model(path, **kwargs)
    return model
