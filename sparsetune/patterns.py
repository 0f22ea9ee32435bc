"""Sparsity targets as settings: the N:M pattern type, its parser and the sparsity range check.

Torch-free on purpose: the settings schemas (and through them every CLI module and `--help`) import these, and
importing torch would cost seconds before a flag is parsed. `sparsetune.masks` re-exports them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sparsetune.errors import SparsetuneError


@dataclass(frozen=True)
class NMPattern:
    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m


def parse_pattern(text: str | None) -> NMPattern | None:
    """Parse "N:M" (0 < N < M). None or "" or "unstructured" -> None."""
    if text is None or text in ("", "unstructured"):
        return None
    if isinstance(text, int):
        raise SparsetuneError(
            f'pattern {text} is a number; quote N:M patterns in YAML, e.g. pattern: "2:4" '
            "(YAML reads 2:4 unquoted as the base-60 number 124)"
        )
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise SparsetuneError(f"pattern {text!r} is not N:M; write it like 2:4 (N kept out of every M)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise SparsetuneError(f"pattern {text!r} needs 0 < N < M; write it like 2:4")
    return NMPattern(n, m)


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise SparsetuneError(f"sparsity {sparsity} is outside [0, 1); pass e.g. --sparsity 0.5")
    return float(sparsity)


def check_regexes(patterns: list[str], what: str) -> list[str]:
    """Raise ValueError naming the first of `patterns` that is not a valid regex (for pydantic validators)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"{what} {pattern!r} is not a valid regex ({err}); e.g. 'self_attn|mlp.down_proj'"
            ) from None
    return patterns
