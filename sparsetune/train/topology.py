"""Sparse topology of `smet-pretrain`: initial layouts (uniform, ERK), drop and grow choices (random, gradient, CTRE's
cosine similarity of activations), the ITOP bitmap.

Every function is deterministic given its inputs (random choices take an explicit generator), so all ranks that
see the same scores make the same choice; `verify_same_across_ranks` checks that they did.
"""

from __future__ import annotations

import hashlib
import math

import torch

from sparsetune import distributed


def erk_densities(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities: a layer's density is proportional to (n_in + n_out) / (n_in * n_out), scaled so
    the total active count is `density` of all weights; layers that would exceed 1 become dense and the rest are
    rescaled."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    numel = {n: s[0] * s[1] for n, s in shapes.items()}
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        weighted = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / weighted if weighted else 0.0
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1]
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.update(over)


def active_count(numel: int, density: float) -> int:
    return min(numel, max(1, round(density * numel)))


def random_layout(shape: tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor:
    """A bool mask with exactly `count` active positions, uniformly at random."""
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:count]] = True
    return mask.view(shape)


def drop(score: torch.Tensor, k: int) -> torch.Tensor:
    """Slots of the k active entries with the smallest score."""
    return torch.topk(score.float(), k, largest=False, sorted=False).indices


def grow(score: torch.Tensor, k: int, exclude: torch.Tensor) -> torch.Tensor:
    """Flat positions of the k largest scores outside `exclude` (the currently active positions)."""
    s = score.detach().reshape(-1).float().clone()
    s[exclude.to(s.device)] = -math.inf
    return torch.topk(s, k, sorted=False).indices


def grow_random(numel: int, k: int, exclude: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """k positions uniformly at random outside `exclude` (SET-style growth)."""
    s = torch.rand(numel, generator=generator)
    s[exclude.cpu()] = -1.0
    return torch.topk(s, k, sorted=False).indices.to(exclude.device)


def grow_cosine(
    x: torch.Tensor, y: torch.Tensor, k: int, blocked: torch.Tensor, chunk_elements: int = 1 << 22
) -> torch.Tensor:
    """CTRE growth (Atashgahi et al. 2022): flat positions of the k connections (o, i) of a [out, in] weight, outside
    `blocked` (a bool per position), whose two neurons' activations are the most alike over a batch: the largest
    |cos(x[:, i], y[:, o])|, with x (tokens, in) the layer's inputs and y (tokens, out) its outputs. A neuron that
    never fires (zero norm) scores 0, as under tf.nn.l2_normalize's epsilon.

    Gradient-free, and no dense similarity outlives the call: the [out, in] cross products are formed `chunk_elements`
    at a time (whole output rows), all-reduced over processes with the squared norms, scored, and only the running
    top k survives a chunk. Every rank gets the same scores, hence the same choice."""
    out_features, in_features = y.shape[1], x.shape[1]
    x, y = x.float(), y.float()
    x_norm = distributed.reduce_sum(x.square().sum(0)).clamp_min(1e-12).sqrt()  # (in,)
    y_norm = distributed.reduce_sum(y.square().sum(0)).clamp_min(1e-12).sqrt()  # (out,)
    blocked = blocked.reshape(-1).to(x.device)
    rows = max(1, chunk_elements // in_features)
    best_score = torch.empty(0, device=x.device)
    best_pos = torch.empty(0, dtype=torch.long, device=x.device)
    for r0 in range(0, out_features, rows):
        r1 = min(r0 + rows, out_features)
        cross = distributed.reduce_sum(y[:, r0:r1].T @ x)  # (rows, in): sum over tokens of y_o x_i
        score = (cross.abs_() / y_norm[r0:r1, None] / x_norm[None, :]).reshape(-1)
        score[blocked[r0 * in_features : r1 * in_features]] = -math.inf
        top = torch.topk(score, min(k, score.numel()), sorted=False)
        best_score = torch.cat([best_score, top.values])
        best_pos = torch.cat([best_pos, top.indices + r0 * in_features])
        if best_score.numel() > k:
            keep = torch.topk(best_score, k, sorted=False).indices
            best_score, best_pos = best_score[keep], best_pos[keep]
        del cross, score
    if best_score.numel() < k or bool(torch.isinf(best_score).any()):
        raise ValueError(f"cannot grow {k} connections: fewer positions are open")
    return best_pos


# ----------------------------------------------------------------------------------------------------------------
# In-time over-parameterization (ITOP): which positions have ever been active, one bit per position.
# Bits are packed little-endian within a byte (position p is bit p % 8 of byte p // 8), numpy's
# packbits(bitorder="little"). Hand-written in torch rather than numpy so the bitmap stays on the weight's device.

_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def empty_bitmap(numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A packed bitmap with room for `numel` positions, all clear."""
    return torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=device)


def mark_bits(bitmap: torch.Tensor, positions: torch.Tensor) -> None:
    """In place: set the bits of the flat `positions` (distinct; repeats would carry into the next bit)."""
    if positions.numel() == 0:
        return
    positions = positions.to(device=bitmap.device, dtype=torch.int64)
    values = _BIT_VALUES.to(bitmap.device)[positions % 8]
    # the distinct bits of one byte sum to at most 255, so the sum is their OR and cannot overflow a uint8
    added = torch.zeros_like(bitmap).index_add_(0, positions // 8, values)
    bitmap.bitwise_or_(added)


def unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """The bool vector of `numel` positions that a packed bitmap holds."""
    bits = bitmap[:, None].bitwise_and(_BIT_VALUES.to(bitmap.device)) != 0
    return bits.reshape(-1)[:numel]


def count_bits(bitmap: torch.Tensor, chunk: int = 1 << 20) -> int:
    """How many bits are set (a byte lookup table, in chunks so the int64 indices stay small)."""
    table = _POPCOUNT.to(bitmap.device)
    return sum(int(table[bitmap[i : i + chunk].long()].sum()) for i in range(0, bitmap.numel(), chunk))


def index_digest(indices: dict[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256()
    for name in sorted(indices):
        h.update(name.encode())
        h.update(indices[name].detach().cpu().to(torch.int64).numpy().tobytes())
    return h.digest()


def verify_same_across_ranks(indices: dict[str, torch.Tensor]) -> None:
    """Raise if any rank holds a different topology (compares a SHA-256 digest of the index sets)."""
    if distributed.world_size() > 1 and not distributed.same_on_every_process(index_digest(indices)):
        raise RuntimeError("sparse topologies differ across ranks after a topology update; please report this bug")
