"""`seft --method granet`: GraNet's gradual magnitude pruning with zero-cost neuroregeneration (Liu et al., NeurIPS
2021) on the masked fine-tuning machinery.

- `config.py`: its settings (torch-free, a block of fields `SeftConfig` inherits);
- `schedule.py`: the cubic sparsity schedule, the update steps and the cosine-decayed regeneration fraction (pure
  functions of the step);
- `selection.py`: which entries a pruning, a regeneration or an N:M step keeps, drops and grows (pure functions
  over tensors);
- `method.py`: the training method on the one loop (masks, optimizer state, the gradient pass, checkpoints).
"""
