"""Sparse-delta fine-tuning (SEFT on SpIEL's machinery): a frozen pruned base plus a budget of trainable
(index, delta) entries per targeted Linear, moved by periodic drop/grow, with a sensitivity re-prune that keeps
the model's sparsity (and N:M pattern) exact.

Files: config (settings), budget (entries per module), delta_linear (the layer and its autograd function),
wrap (module surgery, merge), selection (schedule, window statistics, drop/grow), reprune, optimizer (AdamW over
entries), adapter (seft_adapter.safetensors), method (`SparseDelta`, the training method the loop drives).
"""

from sparsetune.train.sparse_delta.config import DeltaSettings

__all__ = ["DeltaSettings"]
