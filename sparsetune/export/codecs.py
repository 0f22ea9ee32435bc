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
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
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


# ----- bitmasks ------------------------------------------------------------------------------------------------


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)]; bit j of byte b is column 8*b + j (little-endian)."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bitmask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols/8)] -> bool [rows, cols]."""
    unpacked = np.unpackbits(bits.cpu().numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(unpacked.astype(bool))


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


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense [rows, cols] -> the four compressed-tensors sparse-bitmask tensors (key suffixes)."""
    weight = weight.detach().cpu()
    mask = weight != 0  # [rows, cols]
    row_counts = mask.sum(dim=1)  # [rows]
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": weight[mask].contiguous(),  # row-major kept values
        "bitmask": pack_bitmask(mask),
        "row_offsets": (torch.cumsum(row_counts, 0) - row_counts).to(torch.int64),
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
    mask = unpack_bitmask(bits, cols)
    row_counts = mask.sum(dim=1)
    if int(row_counts.sum()) != values.numel():
        raise CorruptTensorError(
            f"{name}: bitmask marks {int(row_counts.sum())} values but compressed holds {values.numel()}"
        )
    if not torch.equal(offsets, torch.cumsum(row_counts, 0) - row_counts):
        raise CorruptTensorError(f"{name}.row_offsets disagree with the bitmask")
    dense = torch.zeros((rows, cols), dtype=values.dtype)
    dense[mask] = values
    return dense


# ----- sparse-24-bitmask ---------------------------------------------------------------------------------------


def nm_group_violations(weight: torch.Tensor) -> int:
    """Groups of 4 consecutive input columns holding more than 2 non-zeros (all groups if cols % 4)."""
    rows, cols = weight.shape
    if cols % 4:
        return rows * -(-cols // 4)
    nonzero = (weight != 0).reshape(rows, cols // 4, 4).sum(dim=2)
    return int((nonzero > 2).sum())


def force_24(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every group of 4 (a plain +0.0 replaces the rest)."""
    keep = nm_mask(weight.detach().abs().float(), TWO_FOUR)
    return weight.detach().masked_fill(~keep, 0)


def _exact_24_mask(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept slots per group of 4: the non-zeros, then the lowest-index zeros to fill the pair."""
    rows, cols = weight.shape
    groups = (weight != 0).reshape(rows, cols // 4, 4).to(torch.int8)  # (rows, groups, 4)
    score = groups * 4 + torch.arange(3, -1, -1, dtype=torch.int8)  # non-zero first, then lower index
    keep = torch.topk(score, 2, dim=2).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True).view(rows, cols)


def sparse24_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact 2:4 dense [rows, cols] -> the three compressed-tensors sparse-24-bitmask tensors."""
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if nm_group_violations(weight):
        raise SparsetuneError("tensor is not 2:4 sparse")  # callers check first; this is a safety net
    mask = _exact_24_mask(weight)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(2, 1),
        "compressed": weight[mask].reshape(rows, cols // 2).contiguous(),
        "bitmask": pack_bitmask(mask),
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
    mask = unpack_bitmask(bits, cols)
    per_group = mask.reshape(rows, cols // 4, 4).sum(dim=2)
    if not bool((per_group == 2).all()):
        raise CorruptTensorError(f"{name}.bitmask does not mark exactly 2 of every 4 columns")
    dense = torch.zeros((rows, cols), dtype=values.dtype)
    dense[mask] = values.reshape(-1)
    return dense


# ----- semi-structured 2:4 (CUTLASS layout) ---------------------------------------------------------------------


def semi_padded_shape(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // SEMI_ROWS) * SEMI_ROWS, -(-cols // SEMI_COLS) * SEMI_COLS


def semi_structured_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact 2:4 dense [rows, cols] -> CUTLASS packed values [R, C/2] and int16 metadata [R, C/16].

    The weight is zero-padded up to the CUTLASS minimum tile (zeros keep every group 2:4). fp16/bf16 go
    straight through PyTorch's converter. For fp32 (whose CUTLASS kernel is 1:2, not 2:4) the metadata is
    built for the 16-bit 2:4 layout from a bf16 proxy, and the fp32 values are gathered at the same slots,
    so the bits survive; load such a model in bf16/fp16 to run it on sparse tensor cores.
    """
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if weight.dtype not in SEMI_DTYPES:
        raise SparsetuneError(f"semi-structured-2:4 stores fp16, bf16 or fp32 weights, not {weight.dtype}")
    if nm_group_violations(weight):
        raise SparsetuneError("tensor is not 2:4 sparse")
    prow, pcol = semi_padded_shape(rows, cols)
    padded = F.pad(weight, (0, pcol - cols, 0, prow - rows)).contiguous()  # [R, C]
    if weight.dtype != torch.float32:
        packed, meta = sparse_semi_structured_from_dense_cutlass(padded)
    else:
        slot = (torch.arange(pcol) % 4 + 1).expand(prow, pcol)  # 1..4 = position inside the group
        proxy = torch.where(padded != 0, slot, 0).to(torch.bfloat16)
        packed_slot, meta = sparse_semi_structured_from_dense_cutlass(proxy)  # [R, C/2] in 0..4
        index = packed_slot.to(torch.int64) - 1  # -1 = a filler slot holding zero
        column = (torch.arange(pcol // 2) // 2 * 4).expand(prow, -1) + index.clamp(min=0)
        packed = torch.where(index >= 0, padded.gather(1, column), torch.zeros((), dtype=padded.dtype))
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "packed": packed.contiguous(),
        "meta": meta.contiguous(),
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
    # Scatter raw bits through an integer view: exact for every dtype, and fp32 uses the 16-bit 2:4 layout.
    as_int = torch.int32 if packed.dtype == torch.float32 else torch.int16
    dense = sparse_semi_structured_to_dense_cutlass(packed.view(as_int), meta).view(packed.dtype)
    return dense[:rows, :cols].contiguous()


# Per format: (key suffixes stored per compressed module, compress, decompress).
CODECS = {
    "sparse-bitmask": (BITMASK_PARAMS, bitmask_compress, bitmask_decompress),
    "sparse-24-bitmask": (SPARSE24_PARAMS, sparse24_compress, sparse24_decompress),
    "semi-structured-2:4": (SEMI_PARAMS, semi_structured_compress, semi_structured_decompress),
}
