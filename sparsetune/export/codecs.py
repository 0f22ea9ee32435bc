"""Pure tensor codecs for the exported sparse layouts, one compress/decompress pair per layout.

All weights are 2-D Linear weights of shape [rows, cols] = [out, in]. A value counts as kept when it is != 0
(so -0.0 is stored as a zero, exactly as compressed-tensors does).

- sparse-bitmask (compressed-tensors): `shape` int64 [2], `compressed` 1-D kept values (row-major, original
  dtype), `bitmask` uint8 [rows, ceil(cols/8)] (little-endian bit order per row), `row_offsets` int64 [rows].
- sparse-24-bitmask (compressed-tensors): `shape` int64 [2, 1], `compressed` [rows, cols/2] (exactly two
  values per group of 4, zeros filling groups with fewer non-zeros), `bitmask` as above.
- semi-structured-2:4 (PyTorch CUTLASS): `packed` [R, C/2] and `meta` int16 [R, C/16] from
  `torch.sparse._semi_structured_conversions`, for the weight zero-padded to R = ceil(rows/32)*32,
  C = ceil(cols/64)*64 (the CUTLASS fp16/bf16 minimum tile), plus `shape` int64 [2] with the unpadded shape.

Speed: the codecs work on the raw bits of the weights (numpy integer views, so -0.0, NaN and every payload
survive exactly). The non-zero mask is packed to bytes once; 256-entry tables then turn each byte (two groups of
4 columns) into its 2:4 violations, its exact-2:4 slots or its CUTLASS metadata, and values are gathered and
scattered in one vectorized pass. The files are byte-identical to the straightforward torch implementations
(tests/export/test_codecs.py compares them on edge cases; `make interop` checks compressed-tensors itself), with
one exception: a bf16 NaN kept by semi-structured-2:4 keeps its bits here, where PyTorch's CPU bf16 gather
rewrites them (0x7FC0 -> 0xFFFF).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.sparse._semi_structured_conversions import (
    _calculate_meta_reordering_scatter_offsets,
    sparse_semi_structured_to_dense_cutlass,
)

from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern, nm_mask

TWO_FOUR = NMPattern(2, 4)
# CUTLASS sparse-operand minimum tile for fp16/bf16; PyTorch requires weights to be multiples of it.
SEMI_ROWS, SEMI_COLS = 32, 64
SEMI_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BITMASK_PARAMS = ("shape", "compressed", "bitmask", "row_offsets")
SPARSE24_PARAMS = ("shape", "compressed", "bitmask")
SEMI_PARAMS = ("shape", "packed", "meta")


class CorruptTensorError(SparsetuneError):
    """A stored compressed tensor is inconsistent with its own shape or mask."""


# ----- byte tables ---------------------------------------------------------------------------------------------
# A packed mask byte holds two groups of 4 columns: the low nibble is the first group, bit i = column i in it.


def _nibble_table(per_nibble) -> np.ndarray:
    """uint8 [256]: per_nibble(n) for the low nibble | per_nibble(n) << 4 for the high nibble."""
    nib = [per_nibble(n) for n in range(16)]
    return np.array([nib[b & 15] | nib[b >> 4] << 4 for b in range(256)], dtype=np.uint8)


def _cutlass_slots(n: int) -> tuple[int, int]:
    """The two positions CUTLASS stores for a group whose non-zero flags are nibble n (PyTorch's logic)."""
    m0, m1, m3 = bool(n & 1), bool(n & 2), bool(n & 8)
    idx0 = int(not m0 and m1) | int(not m0 and not m1) << 1
    idx1 = int((m0 and m1) or (not m0 and not m1) or m3) | int((not m0 and m1) or not m1) << 1
    return idx0, idx1


def _fill_24(n: int) -> int:
    """Exactly 2 slots: the non-zeros, then the lowest-index zeros (n must hold at most 2 bits)."""
    for i in range(4):
        if bin(n).count("1") < 2 and not n >> i & 1:
            n |= 1 << i
    return n


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)
_EXACT_24 = _nibble_table(lambda n: _fill_24(n) if bin(n).count("1") <= 2 else n)
# Non-zero flags -> CUTLASS kept slots (low byte) | metadata nibbles idx0 | idx1 << 2 (high byte), one lookup.
_SEMI_KEEP_META = (
    _nibble_table(lambda n: 1 << _cutlass_slots(n)[0] | 1 << _cutlass_slots(n)[1]).astype(np.uint16)
    | _nibble_table(lambda n: _cutlass_slots(n)[0] | _cutlass_slots(n)[1] << 2).astype(np.uint16) << 8
)
# CUTLASS metadata nibble -> kept slots; only idx0 < idx1 is what the converter writes (others -> no slot).
_META_KEEP = _nibble_table(lambda n: 1 << (n & 3) | 1 << (n >> 2) if (n & 3) < (n >> 2) else 0)
_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _popcount(packed: np.ndarray) -> np.ndarray:
    """Set bits per uint8 (np.bitwise_count on numpy >= 2, a table otherwise)."""
    count = getattr(np, "bitwise_count", None)
    return count(packed) if count is not None else _POPCOUNT[packed]


def _group_counts(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-zeros in the first (low nibble) and second (high nibble) group of 4 columns of each packed byte."""
    return _popcount(packed & np.uint8(0x0F)), _popcount(packed >> np.uint8(4))


def _violations(packed: np.ndarray) -> int:
    """Groups of 4 with more than 2 non-zeros in a packed mask (padding nibbles are empty, so never count)."""
    low, high = _group_counts(packed)
    return int(np.count_nonzero(low > 2)) + int(np.count_nonzero(high > 2))


def _bits(t: torch.Tensor) -> np.ndarray | None:
    """The raw bits of a CPU floating tensor as a numpy integer array (shared memory), else None."""
    as_int = _INT_VIEWS.get(t.element_size())
    if as_int is None or not t.dtype.is_floating_point or t.device.type != "cpu":
        return None
    return t.detach().contiguous().view(as_int).numpy()


def _nonzero(bits: np.ndarray) -> np.ndarray:
    """bool mask of values != 0 from raw float bits (the sign bit dropped, so -0.0 counts as zero)."""
    magnitude = np.iinfo(bits.dtype).max  # all bits but the sign
    return (bits & magnitude) != 0


def _mask_of(weight: torch.Tensor) -> np.ndarray:
    bits = _bits(weight)
    return _nonzero(bits) if bits is not None else (weight.detach().cpu() != 0).numpy()


def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, axis=-1, bitorder="little")


def _unpack(packed: np.ndarray, cols: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=cols, bitorder="little").view(bool)


def _gather(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The values at the mask's True slots, row-major (np.compress: several times faster than values[mask])."""
    return np.compress(mask.reshape(-1), values.reshape(-1))


def _scatter(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Zeros of the mask's shape holding `values` at its True slots, row-major."""
    dense = np.zeros(mask.size, dtype=values.dtype)
    dense[np.flatnonzero(mask)] = values.reshape(-1)
    return dense.reshape(mask.shape)


def _as_tensor(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(bits).view(dtype)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)]; bit j of byte b is column 8*b + j (little-endian)."""
    return torch.from_numpy(_pack(mask.cpu().numpy()))


def unpack_bitmask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols/8)] -> bool [rows, cols]."""
    return torch.from_numpy(_unpack(bits.cpu().numpy(), cols))


def _padding_bits_clear(bits: torch.Tensor, cols: int) -> bool:
    """The unused high bits of each row's last byte must be zero (the writers pad with zeros)."""
    spare = bits.shape[1] * 8 - cols
    if spare == 0:
        return True
    return bool((bits[:, -1] >> (8 - spare)).eq(0).all())


def _dense_shape(shape: torch.Tensor, name: str) -> tuple[int, int]:
    if shape.dtype != torch.int64 or shape.numel() != 2:
        raise CorruptTensorError(f"{name}.shape should hold 2 int64 values, found {shape.dtype} {list(shape.shape)}")
    rows, cols = (int(v) for v in shape.reshape(-1))
    if rows <= 0 or cols <= 0:
        raise CorruptTensorError(f"{name}.shape holds an impossible shape [{rows}, {cols}]")
    return rows, cols


def _expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != shape:
        raise CorruptTensorError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise CorruptTensorError(f"{name} has dtype {t.dtype}, expected {dtype}")


def _check_values_dtype(values: torch.Tensor, name: str) -> None:
    if not values.dtype.is_floating_point:
        raise CorruptTensorError(f"{name} has dtype {values.dtype}; expected a floating-point weight dtype")


# ----- sparse-bitmask ------------------------------------------------------------------------------------------


def _values_at(weight: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """weight[mask] (row-major, bit-exact), gathered on the raw bits."""
    bits = _bits(weight)
    if bits is None:
        return weight.detach().cpu()[torch.from_numpy(mask)].contiguous()
    return _as_tensor(_gather(bits, mask), weight.dtype)


def _dense_from(mask: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    """Zeros of the mask's shape with `values` (row-major) scattered onto its True slots, bit-exact."""
    bits = _bits(values)
    if bits is None:
        dense = torch.zeros(mask.shape, dtype=values.dtype)
        dense[torch.from_numpy(mask)] = values.reshape(-1)
        return dense
    return _as_tensor(_scatter(mask, bits), values.dtype)


def _row_offsets(counts: np.ndarray) -> np.ndarray:
    """Start of each row's values: the exclusive cumulative sum of the kept values per row."""
    return np.cumsum(counts) - counts


def _row_counts(packed: np.ndarray) -> np.ndarray:
    """Set bits per row of a packed mask (its padding bits must be clear)."""
    return _popcount(packed).sum(axis=1, dtype=np.int64)


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense [rows, cols] -> the four compressed-tensors sparse-bitmask tensors (key suffixes)."""
    weight = weight.detach().cpu()
    mask = _mask_of(weight)  # [rows, cols]
    packed = _pack(mask)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": _values_at(weight, mask),  # row-major kept values
        "bitmask": torch.from_numpy(packed),
        "row_offsets": torch.from_numpy(_row_offsets(_row_counts(packed))),
    }


def bitmask_decompress(parts: dict[str, torch.Tensor], name: str = "weight") -> torch.Tensor:
    """Validate and expand sparse-bitmask tensors back to the dense weight."""
    rows, cols = _dense_shape(parts["shape"], name)
    bits, values, offsets = parts["bitmask"], parts["compressed"], parts["row_offsets"]
    _expect(bits, f"{name}.bitmask", (rows, -(-cols // 8)), torch.uint8)
    _expect(offsets, f"{name}.row_offsets", (rows,), torch.int64)
    _check_values_dtype(values, f"{name}.compressed")
    if values.dim() != 1:
        raise CorruptTensorError(f"{name}.compressed should be 1-D, found shape {list(values.shape)}")
    if not _padding_bits_clear(bits, cols):
        raise CorruptTensorError(f"{name}.bitmask has bits set past column {cols}")
    packed = bits.cpu().numpy()
    counts = _row_counts(packed)
    marked = int(counts.sum())
    if marked != values.numel():
        raise CorruptTensorError(f"{name}: bitmask marks {marked} values but compressed holds {values.numel()}")
    if not np.array_equal(offsets.cpu().numpy(), _row_offsets(counts)):
        raise CorruptTensorError(f"{name}.row_offsets disagree with the bitmask")
    return _dense_from(_unpack(packed, cols), values.cpu())


# ----- sparse-24-bitmask ---------------------------------------------------------------------------------------


def nm_group_violations(weight: torch.Tensor) -> int:
    """Groups of 4 consecutive input columns holding more than 2 non-zeros (all groups if cols % 4)."""
    rows, cols = weight.shape
    if cols % 4:
        return rows * -(-cols // 4)
    if weight.device.type != "cpu":
        nonzero = (weight != 0).reshape(rows, cols // 4, 4).sum(dim=2)
        return int((nonzero > 2).sum())
    return _violations(_pack(_mask_of(weight)))


def mask_stats(weight: torch.Tensor) -> tuple[int, int]:
    """(non-zeros, nm_group_violations) of a 2-D weight, from one pass over its bits."""
    rows, cols = weight.shape
    mask = _mask_of(weight)
    nonzero = int(np.count_nonzero(mask))
    return nonzero, (rows * -(-cols // 4) if cols % 4 else _violations(_pack(mask)))


def force_24(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every group of 4 (a plain +0.0 replaces the rest)."""
    keep = nm_mask(weight.detach().abs().float(), TWO_FOUR)
    return weight.detach().masked_fill(~keep, 0)


def _exact_24_bytes(nonzero: np.ndarray, cols: int) -> np.ndarray:
    """Packed mask of exactly 2 kept slots per group of 4: the non-zeros, then the lowest-index zeros."""
    packed = _EXACT_24[nonzero]
    if cols % 8:  # cols % 8 == 4: the last byte's high nibble is padding, not a group
        packed[:, -1] &= 0x0F
    return packed


def sparse24_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact 2:4 dense [rows, cols] -> the three compressed-tensors sparse-24-bitmask tensors."""
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    nonzero = _pack(_mask_of(weight))
    if cols % 4 or _violations(nonzero):
        raise SparsetuneError("tensor is not 2:4 sparse")  # callers check first; this is a safety net
    packed = _exact_24_bytes(nonzero, cols)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(2, 1),
        "compressed": _values_at(weight, _unpack(packed, cols)).reshape(rows, cols // 2),
        "bitmask": torch.from_numpy(packed),
    }


def sparse24_decompress(parts: dict[str, torch.Tensor], name: str = "weight") -> torch.Tensor:
    """Validate and expand sparse-24-bitmask tensors back to the dense weight."""
    rows, cols = _dense_shape(parts["shape"], name)
    if cols % 4:
        raise CorruptTensorError(f"{name}.shape has {cols} columns, not a multiple of 4 as 2:4 needs")
    bits, values = parts["bitmask"], parts["compressed"]
    _expect(bits, f"{name}.bitmask", (rows, -(-cols // 8)), torch.uint8)
    _expect(values, f"{name}.compressed", (rows, cols // 2))
    _check_values_dtype(values, f"{name}.compressed")
    packed = bits.cpu().numpy()
    low, high = _group_counts(packed)
    high = high[:, : cols // 8]  # with cols % 8 == 4 the last byte's high nibble is padding
    if not (bool((low == 2).all()) and bool((high == 2).all())):
        raise CorruptTensorError(f"{name}.bitmask does not mark exactly 2 of every 4 columns")
    return _dense_from(_unpack(packed, cols), values.cpu())


# ----- semi-structured 2:4 (CUTLASS layout) ---------------------------------------------------------------------


def semi_padded_shape(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // SEMI_ROWS) * SEMI_ROWS, -(-cols // SEMI_COLS) * SEMI_COLS


@lru_cache(maxsize=32)
def _meta_offsets(prow: int, meta_cols: int) -> np.ndarray:
    """Where PyTorch's converter scatters each int16 metadata element (CUTLASS ColumnMajorInterleaved<2>)."""
    offsets = _calculate_meta_reordering_scatter_offsets(prow, meta_cols, torch.int16, "cpu").numpy()
    offsets.flags.writeable = False
    return offsets


def semi_structured_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact 2:4 dense [rows, cols] -> CUTLASS packed values [R, C/2] and int16 metadata [R, C/16].

    The weight is zero-padded up to the CUTLASS minimum tile (zeros keep every group 2:4). The result is what
    `torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass` gives for fp16/bf16
    (each group stores slots idx0 < idx1 chosen from its non-zero flags; metadata nibble idx0 | idx1 << 2, four
    groups per int16, then reordered), computed here from byte tables. fp32 (whose CUTLASS kernel is 1:2, not
    2:4) uses the same 16-bit 2:4 metadata and slots, with +0.0 in slots that hold no non-zero, so the bits
    survive; load such a model in bf16/fp16 to run it on sparse tensor cores.
    """
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if weight.dtype not in SEMI_DTYPES:
        raise SparsetuneError(f"semi-structured-2:4 stores fp16, bf16 or fp32 weights, not {weight.dtype}")
    prow, pcol = semi_padded_shape(rows, cols)
    padded = _bits(weight)
    if (prow, pcol) != (rows, cols):
        padded = np.zeros((prow, pcol), dtype=padded.dtype)  # [R, C], +0.0 padding
        padded[:rows, :cols] = _bits(weight)
    packed_mask = _pack(_nonzero(padded))  # [R, C/8]: two groups per byte
    if cols % 4 or _violations(packed_mask):
        raise SparsetuneError("tensor is not 2:4 sparse")
    keep_meta = _SEMI_KEEP_META[packed_mask]
    values = _gather(padded, _unpack(keep_meta.astype(np.uint8), pcol))
    if weight.dtype == torch.float32:
        values[~_nonzero(values)] = 0  # filler slots hold +0.0 (a -0.0 there becomes +0.0)
    meta_bytes = (keep_meta >> 8).astype(np.uint8)  # [R, C/8]
    meta = meta_bytes.view("<i2").astype(np.int16, copy=False)  # [R, C/16]: 4 nibbles per int16, group 0 low
    reordered = np.empty(meta.size, dtype=np.int16)
    reordered[_meta_offsets(prow, pcol // 16)] = meta.reshape(-1)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "packed": _as_tensor(values.reshape(prow, pcol // 2), weight.dtype),
        "meta": torch.from_numpy(reordered.reshape(prow, pcol // 16)),
    }


def semi_structured_decompress(parts: dict[str, torch.Tensor], name: str = "weight") -> torch.Tensor:
    """Validate and expand CUTLASS packed values + metadata back to the unpadded dense weight."""
    rows, cols = _dense_shape(parts["shape"], name)
    packed, meta = parts["packed"], parts["meta"]
    prow, pcol = semi_padded_shape(rows, cols)
    _expect(packed, f"{name}.packed", (prow, pcol // 2))
    _expect(meta, f"{name}.meta", (prow, pcol // 16), torch.int16)
    if packed.dtype not in SEMI_DTYPES:
        raise CorruptTensorError(f"{name}.packed has dtype {packed.dtype}; expected fp16, bf16 or fp32")
    ordered = meta.cpu().contiguous().numpy().reshape(-1)[_meta_offsets(prow, pcol // 16)]
    meta_bytes = ordered.astype("<i2", copy=False).view(np.uint8).reshape(prow, pcol // 8)
    keep = _META_KEEP[meta_bytes]
    low, high = _group_counts(keep)
    if bool((low == 2).all()) and bool((high == 2).all()):
        dense = _dense_from(_unpack(keep, pcol), packed.cpu())
    else:  # metadata our writer never produces: let PyTorch's converter define the result
        # Scatter raw bits through an integer view: exact for every dtype, and fp32 uses the 16-bit 2:4 layout.
        as_int = torch.int32 if packed.dtype == torch.float32 else torch.int16
        dense = sparse_semi_structured_to_dense_cutlass(packed.cpu().view(as_int), meta.cpu()).view(packed.dtype)
    return dense[:rows, :cols].contiguous()


# Per format: (key suffixes stored per compressed module, compress, decompress).
CODECS = {
    "sparse-bitmask": (BITMASK_PARAMS, bitmask_compress, bitmask_decompress),
    "sparse-24-bitmask": (SPARSE24_PARAMS, sparse24_compress, sparse24_decompress),
    "semi-structured-2:4": (SEMI_PARAMS, semi_structured_compress, semi_structured_decompress),
}
