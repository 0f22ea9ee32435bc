"""One targeted Linear under sparse-delta fine-tuning: a frozen base weight plus k (index, delta) entries.

effective weight = base (re-pruned positions read as 0) + the deltas scattered at their indices.

The base is never a trainable parameter and never gets a `.grad`. A custom autograd function forms the module's
dense weight gradient only inside its backward, gathers it at the indices into `delta.grad`, shows it to the open
selection window (if any) and lets it go: no dense gradient outlives one module's backward.

The base is kept exactly as loaded (in bf16/fp32, or bitsandbytes NF4): re-pruned positions are a small index
list zeroed in the transient weight, so the base stays bit-identical to the input, re-pruning can be undone, and
the adapter's base identity is that of the input model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from sparsetune.errors import SparsetuneError

INT64_INDEX_AT = 2**31  # a weight with this many entries or more needs int64 indices
NF4_BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights

Observer = Callable[[torch.Tensor], None]  # receives the dense (out, in) weight gradient inside backward


def index_dtype(numel: int) -> torch.dtype:
    return torch.int64 if numel >= INT64_INDEX_AT else torch.int32


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as a packed uint8 bitmap (little-endian bits per byte)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, device=bitmap.device, dtype=torch.uint8)
    return ((bitmap[:, None] >> shifts) & 1).bool().reshape(-1)[:numel]


def require_bitsandbytes(device: torch.device) -> None:
    """Raise a one-line error unless bitsandbytes can 4-bit quantize and dequantize on `device`."""
    try:
        import bitsandbytes.functional as bnbf

        probe = torch.linspace(-1, 1, 128, device=device).view(2, 64)
        packed, state = bnbf.quantize_4bit(probe, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
        ok = bool((bnbf.dequantize_4bit(packed, state) - probe).abs().max() < 0.2)
    except Exception as err:  # noqa: BLE001 - any failure means "not working" here
        raise SparsetuneError(
            f"--base-dtype nf4 needs a working bitsandbytes on {device} ({type(err).__name__}: {err}); "
            "install bitsandbytes >= 0.45 or pass --base-dtype bf16"
        ) from None
    if not ok:
        raise SparsetuneError(
            f"bitsandbytes 4-bit round trip on {device} is wrong; update bitsandbytes or pass --base-dtype bf16"
        )


def quantize_nf4(linear: nn.Linear) -> nn.Module:
    """A frozen bitsandbytes `Linear4bit` (NF4) holding `linear`'s weight and bias."""
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=weight.dtype,
        quant_type="nf4",
        device=weight.device,
    )
    quantized.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    quantized = quantized.to(weight.device)  # Params4bit quantizes when moved to its device
    if weight.device.type == "cpu" and not getattr(quantized.weight, "bnb_quantized", True):
        quantized.weight = quantized.weight._quantize(weight.device)  # pragma: no cover - older bitsandbytes
    return quantized


def is_nf4(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


class DeltaLinear(nn.Module):
    """A frozen base Linear (`self.base`, nn.Linear or bitsandbytes Linear4bit) plus k trainable entries.

    Attributes:
        indices: flat positions of the entries (buffer; int32, int64 for >= 2**31 weights), slot order.
        delta: float32 values added at `indices` (the only trainable tensor), initialised to 0.
        repruned: flat positions removed from the base by the re-prune (buffer, int64, sorted).
        input_support: packed bitmap of the input's non-zeros (NF4 bases only, whose 4-bit values may round a
            small non-zero to 0); a bf16/fp32 base is unchanged, so its own zeros say it.
        observer: called with the dense weight gradient in backward while a selection window is open.
    """

    def __init__(self, base: nn.Module, k: int, input_dtype: torch.dtype, input_support: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.input_dtype = input_dtype
        self.register_buffer("indices", torch.zeros(k, dtype=index_dtype(self.numel), device=device))
        self.delta = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))
        self.register_buffer("repruned", torch.zeros(0, dtype=torch.int64, device=device))
        if input_support is not None:
            self.register_buffer("input_support", input_support)
        else:
            self.input_support = None
        self.observer: Observer | None = None
        self.identity: dict[str, str] = {}  # the input weight's shape and hashes, for the adapter
        self.nf4_zeroed: tuple[torch.Tensor, torch.Tensor] | None = None  # NF4 base: input non-zeros it reads as 0
        self.merged_counts: dict[str, int] | None = None  # set by the merge, which releases the base (wrap.py)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def k(self) -> int:
        return self.delta.numel()

    @property
    def device(self) -> torch.device:
        return self.delta.device

    # -- weights ----------------------------------------------------------------------------------------------

    def base_weight(self, dtype: torch.dtype | None = None, repruned: bool = True) -> torch.Tensor:
        """A new tensor: the base (dequantized if NF4) with re-pruned positions 0 (unless `repruned` is False:
        then the input's values). Never a view of the base."""
        if is_nf4(self.base):
            import bitsandbytes.functional as bnbf

            w = bnbf.dequantize_4bit(self.base.weight.data, self.base.weight.quant_state)
            w = w.to(dtype) if dtype is not None else w
        else:
            w = self.base.weight.detach().to(dtype or self.base.weight.dtype, copy=True)
        if repruned and self.repruned.numel():
            w.view(-1).index_fill_(0, self.repruned, 0)
        return w

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """base + scatter(delta), summed in float32 at the entries and cast to `dtype` (the compute dtype).
        Where delta is 0 the result is the base value bit for bit."""
        w = self.base_weight(dtype)
        flat = w.view(-1)
        idx = self.indices
        flat.index_copy_(0, idx.long(), (flat.index_select(0, idx).float() + self.delta.detach()).to(w.dtype))
        return w

    def input_nonzero(self) -> torch.Tensor:
        """Bool (out, in): the input model's non-zeros (before any re-prune)."""
        if self.input_support is not None:
            return unpack_bits(self.input_support, self.numel).view(self.shape)
        return self.base.weight.detach() != 0

    def zero_in_base(self, positions: torch.Tensor) -> torch.Tensor:
        """Bool per flat position: the base reads 0 there (zero in the input, or re-pruned)."""
        positions = positions.long()
        zero = ~self.input_nonzero().view(-1)[positions]
        if self.repruned.numel():
            zero |= torch.isin(positions, self.repruned)
        return zero

    def bias_for(self, dtype: torch.dtype) -> torch.Tensor | None:
        bias = self.base.bias
        return None if bias is None else bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DeltaLinearFunction.apply(x, self.delta, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, entries={self.k}"


class DeltaLinearFunction(torch.autograd.Function):
    """y = x @ (base + scatter(delta))^T + b, whose backward returns only the input and delta gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(x)
        # The weight is rebuilt in backward rather than saved: saving it would keep a dense copy of every
        # targeted weight alive between the forward and the backward pass.
        return F.linear(x, layer.effective_weight(x.dtype), layer.bias_for(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        layer: DeltaLinear = ctx.layer
        grad_x = grad_out @ layer.effective_weight(grad_out.dtype) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1] and layer.observer is None:
            return grad_x, None, None
        go2, x2 = grad_out.reshape(-1, layer.out_features), x.reshape(-1, layer.in_features)  # (T, out), (T, in)
        if layer.observer is None and use_sampled_gradient(go2):
            return grad_x, sampled_weight_grad(go2, x2, layer.indices, layer.shape), None
        dense = go2.t() @ x2  # (out, in)
        grad_delta = dense.view(-1).index_select(0, layer.indices).float()
        if layer.observer is not None:
            layer.observer(dense)
        del dense  # the module's dense weight gradient ends here
        return grad_x, grad_delta, None


def use_sampled_gradient(grad_out: torch.Tensor) -> bool:
    """SDDMM instead of the dense weight gradient outside selection windows: on CPU in float32, where it measured
    about 3x faster for a LoRA-r16-sized budget of a 576x1536 weight. CUDA keeps the dense GEMM (cuBLAS; the
    cuSPARSE SDDMM was not measured here)."""
    return grad_out.device.type == "cpu" and grad_out.dtype == torch.float32


def sampled_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """(grad_out^T @ x) at the flat `indices` only (SDDMM), without forming the dense (out, in) gradient.

    grad_out: (T, out), x: (T, in). torch's sampled_addmm wants a CSR pattern, so the entries are visited in
    sorted order and the values put back in slot order.
    """
    out_f, in_f = shape
    flat = indices.long()
    order = torch.argsort(flat)
    ordered = flat[order]
    crow = torch.zeros(out_f + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(ordered // in_f, minlength=out_f).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": true, and not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            ordered % in_f,
            torch.zeros(flat.numel(), dtype=x.dtype, device=x.device),
            shape,
            check_invariants=False,
        )
    values = torch.sparse.sampled_addmm(pattern, grad_out.t(), x, beta=0.0).values()
    grad = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    grad[order] = values.float()
    return grad
