"""The fast export codecs (numpy bit views and byte tables) against straightforward torch references.

The references below are the plain implementations of each layout (compressed-tensors' `tensor != 0` masks and
PyTorch's own CUTLASS converter); every compressed tensor must match them bit for bit, and decompression must
give back the same bits, on edge cases: -0.0, NaN payloads, infinities, subnormals, groups of 4 with fewer than
two non-zeros, every 2:4 group pattern, partial bitmask bytes and CUTLASS padding.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from sparsetune.errors import SparsetuneError
from sparsetune.export import codecs
from sparsetune.export.codecs import CorruptTensorError
from sparsetune.masks import NMPattern, nm_mask

INT_VIEW = {2: torch.int16, 4: torch.int32}

# ----- references ------------------------------------------------------------------------------------------------


def ref_pack(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = mask.shape
    padded = F.pad(mask.to(torch.uint8), (0, -cols % 8)).view(rows, -1, 8).to(torch.int32)
    return (padded << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def ref_bitmask_compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = w != 0
    counts = mask.sum(1)
    return {
        "shape": torch.tensor(list(w.shape), dtype=torch.int64),
        "compressed": w[mask].contiguous(),
        "bitmask": ref_pack(mask),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def ref_sparse24_compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    groups = (w != 0).reshape(rows, cols // 4, 4).to(torch.int8)
    score = groups * 4 + torch.arange(3, -1, -1, dtype=torch.int8)  # non-zeros first, then the lowest index
    keep = torch.topk(score, 2, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True).view(rows, cols)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(2, 1),
        "compressed": w[mask].reshape(rows, cols // 2),
        "bitmask": ref_pack(mask),
    }


def ref_semi_compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    prow, pcol = codecs.semi_padded_shape(rows, cols)
    padded = F.pad(w, (0, pcol - cols, 0, prow - rows)).contiguous()
    if w.dtype != torch.float32:
        packed, meta = sparse_semi_structured_from_dense_cutlass(padded)
    else:  # 16-bit metadata from a bf16 proxy of slot numbers; fp32 values gathered at the same slots
        slot = (torch.arange(pcol) % 4 + 1).expand(prow, pcol)
        proxy = torch.where(padded != 0, slot, 0).to(torch.bfloat16)
        packed_slot, meta = sparse_semi_structured_from_dense_cutlass(proxy)
        index = packed_slot.to(torch.int64) - 1
        column = (torch.arange(pcol // 2) // 2 * 4).expand(prow, -1) + index.clamp(min=0)
        packed = torch.where(index >= 0, padded.gather(1, column), torch.zeros((), dtype=padded.dtype))
    return {"shape": torch.tensor([rows, cols], dtype=torch.int64), "packed": packed, "meta": meta}


def ref_masked_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    rows, cols = parts["shape"].reshape(-1).tolist()
    shifts = torch.arange(8, dtype=torch.uint8)
    mask = ((parts["bitmask"].unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, -1)[:, :cols]
    dense = torch.zeros((rows, cols), dtype=parts["compressed"].dtype)
    dense[mask] = parts["compressed"].reshape(-1)
    return dense


def ref_semi_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    rows, cols = parts["shape"].tolist()
    packed = parts["packed"]
    dense = sparse_semi_structured_to_dense_cutlass(packed.view(INT_VIEW[packed.element_size()]), parts["meta"])
    return dense.view(packed.dtype)[:rows, :cols]


# ----- inputs ----------------------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.element_size()]) if t.numel() and t.is_floating_point() else t


def assert_parts_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.equal(bits(got[key]), bits(want[key])), key


def sparse_weight(rows: int, cols: int, dtype: torch.dtype, pattern: str, seed: int = 0) -> torch.Tensor:
    """Random sparse weight with -0.0 in half the pruned slots and NaN / inf / subnormal kept values."""
    gen = torch.Generator().manual_seed(seed)
    if pattern == "2:4":  # 2:4, then some kept slots dropped too: groups with 0 or 1 non-zeros
        keep = nm_mask(torch.rand(rows, cols, generator=gen), NMPattern(2, 4))
        keep &= torch.rand(rows, cols, generator=gen) > 0.2
    else:
        keep = torch.rand(rows, cols, generator=gen) > torch.rand(rows, 1, generator=gen)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    w = torch.where(keep, w, torch.zeros((), dtype=dtype))
    w[~keep & (torch.rand(rows, cols, generator=gen) > 0.5)] = -0.0
    kept = keep.view(-1).nonzero().view(-1)
    tiny = torch.finfo(dtype).tiny
    specials = [float("nan"), float("inf"), -float("inf"), tiny / 4, -tiny / 8]
    flat = w.view(-1)
    for i, value in zip(kept[torch.randperm(kept.numel(), generator=gen)].tolist(), specials, strict=False):
        flat[i] = value
    if kept.numel() > len(specials):  # a NaN with every bit set (sign and payload)
        flat.view(INT_VIEW[w.element_size()])[kept[-1]] = -1
    return w


SHAPES = [(1, 4), (3, 8), (5, 12), (32, 64), (33, 100), (64, 68), (40, 200)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_bitmask_matches_reference(dtype, pattern):
    for rows, cols in [*SHAPES, (7, 9), (2, 1)]:
        if pattern == "2:4" and cols % 4:
            continue
        w = sparse_weight(rows, cols, dtype, pattern)
        parts = codecs.bitmask_compress(w)
        assert_parts_equal(parts, ref_bitmask_compress(w))
        dense = codecs.bitmask_decompress(parts)
        assert torch.equal(bits(dense), bits(ref_masked_decompress(parts)))
        assert torch.equal(bits(dense), bits(torch.where(w == 0, 0, w)))  # only -0.0 -> +0.0 changes
        assert codecs.mask_stats(w) == (int(torch.count_nonzero(w)), codecs.nm_group_violations(w))
        parts_t = codecs.bitmask_compress(w.t().contiguous().t())  # non-contiguous input
        assert_parts_equal(parts_t, parts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_four_formats_match_reference(dtype):
    for rows, cols in SHAPES:
        w = sparse_weight(rows, cols, dtype, "2:4", seed=rows)
        assert codecs.nm_group_violations(w) == 0
        parts = codecs.sparse24_compress(w)
        assert_parts_equal(parts, ref_sparse24_compress(w))
        assert torch.equal(bits(codecs.sparse24_decompress(parts)), bits(ref_masked_decompress(parts)))
        semi = codecs.semi_structured_compress(w)
        ref = ref_semi_compress(w)
        if dtype == torch.bfloat16:  # PyTorch's CPU bf16 gather rewrites NaN payloads (0x7FC0 -> 0xFFFF)
            nan = ref["packed"].isnan()
            assert torch.equal(semi["packed"].isnan(), nan)
            ref["packed"] = torch.where(nan, semi["packed"], ref["packed"])
        assert_parts_equal(semi, ref)
        assert torch.equal(bits(codecs.semi_structured_decompress(semi)), bits(ref_semi_decompress(semi)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_group_pattern(dtype):
    """Each pair of 2:4 group patterns (at most 2 non-zeros of 4) side by side, zeros stored as -0.0."""
    patterns = [p for p in range(16) if bin(p).count("1") <= 2]
    pairs = itertools.product(patterns, repeat=2)
    mask = torch.tensor([[(pair[g % 2] >> j) & 1 for g in range(16) for j in range(4)] for pair in pairs]).bool()
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)).to(dtype) + 5
    w = torch.where(mask, values, torch.tensor(-0.0, dtype=dtype))
    parts = codecs.sparse24_compress(w)
    assert_parts_equal(parts, ref_sparse24_compress(w))
    assert torch.equal(bits(codecs.sparse24_decompress(parts)), bits(ref_masked_decompress(parts)))
    semi = codecs.semi_structured_compress(w)
    assert_parts_equal(semi, ref_semi_compress(w))
    assert torch.equal(bits(codecs.semi_structured_decompress(semi)), bits(ref_semi_decompress(semi)))


def test_semi_structured_metadata_the_writer_never_makes_decodes_like_pytorch():
    w = sparse_weight(64, 128, torch.bfloat16, "2:4")
    parts = codecs.semi_structured_compress(w)
    meta = parts["meta"].clone()
    meta.view(-1)[5] = 0x1111  # idx0 == 1 > idx1 == 0 in every nibble: not what the converter writes
    odd = {**parts, "meta": meta}
    assert torch.equal(bits(codecs.semi_structured_decompress(odd)), bits(ref_semi_decompress(odd)))


def test_violations_count_groups_with_more_than_two_nonzeros():
    w = torch.zeros(2, 12)
    w[0, :3] = 1  # 3 of 4
    w[1, 4:8] = 1  # 4 of 4
    w[1, 8:10] = -0.0  # -0.0 is a zero
    assert codecs.nm_group_violations(w) == 2 and codecs.mask_stats(w) == (7, 2)
    assert codecs.nm_group_violations(torch.ones(3, 6)) == 6  # cols % 4: every group
    with pytest.raises(SparsetuneError, match="not 2:4"):
        codecs.sparse24_compress(w)
    with pytest.raises(SparsetuneError, match="not 2:4"):
        codecs.semi_structured_compress(w)


def test_corrupted_parts_are_refused():
    w = sparse_weight(16, 100, torch.bfloat16, "unstructured")
    parts = codecs.bitmask_compress(w)
    flipped = {**parts, "bitmask": parts["bitmask"].clone()}
    flipped["bitmask"][0, 3] ^= 1
    with pytest.raises(CorruptTensorError, match="bitmask marks"):
        codecs.bitmask_decompress(flipped, "m")
    padding = {**parts, "bitmask": parts["bitmask"].clone()}
    padding["bitmask"][:, -1] |= 0x80
    with pytest.raises(CorruptTensorError, match="bits set past column 100"):
        codecs.bitmask_decompress(padding, "m")
    offsets = {**parts, "row_offsets": parts["row_offsets"].clone()}
    offsets["row_offsets"][3] += 1
    with pytest.raises(CorruptTensorError, match="row_offsets disagree"):
        codecs.bitmask_decompress(offsets, "m")
    parts24 = codecs.sparse24_compress(sparse_weight(16, 100, torch.bfloat16, "2:4"))
    bad = {**parts24, "bitmask": parts24["bitmask"].clone()}
    bad["bitmask"][2, 1] ^= 1
    with pytest.raises(CorruptTensorError, match="exactly 2 of every 4"):
        codecs.sparse24_decompress(bad, "m")
    pad = {**parts24, "bitmask": parts24["bitmask"].clone()}
    pad["bitmask"][:, -1] |= 0xF0  # 100 columns: the high nibble of the last byte is padding, ignored
    assert torch.equal(bits(codecs.sparse24_decompress(pad)), bits(codecs.sparse24_decompress(parts24)))
