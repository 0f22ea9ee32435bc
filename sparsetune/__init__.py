"""sparsetune: prune, repair, pretrain, evaluate and export sparse LLMs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The packages whose outputs wrap a model register their input formats with `sparsetune.input_formats` on import;
# importing them here registers both before anything loads, whatever the entry point. Both stay light (no torch).
from sparsetune import export as _exported_dirs  # noqa: E402, F401
from sparsetune.train import sparse_delta as _seft_adapters  # noqa: E402, F401


def load(path: str, semi_structured: bool = False, **kwargs: Any) -> Any:
    """Load any sparsetune output dir (plain HF or an exported sparse format) as a transformers model.

    With `semi_structured=True`, exact 2:4 fp16/bf16 Linears run on sparse tensor cores (CUDA, compute
    capability >= 8.0); elsewhere the weights stay decompressed and one info line says so.
    """
    from sparsetune.loading import load_model  # torch: on use, so `import sparsetune` (the CLI's --help) stays light

    model, _ = load_model(path, **kwargs)
    if semi_structured:
        from sparsetune.export.loader import to_semi_structured  # as above

        to_semi_structured(model)
    return model
