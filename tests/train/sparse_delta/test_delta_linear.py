"""DeltaLinear: forward/backward against a dense reference, no base gradient, bit-exact drop, NF4 base."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from sparsetune.train.sparse_delta.delta_linear import (
    DeltaLinear,
    index_dtype,
    pack_bits,
    quantize_nf4,
    unpack_bits,
)


def _layer(k: int = 20, dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0) -> DeltaLinear:
    torch.manual_seed(seed)
    base = nn.Linear(12, 6, bias=bias).to(dtype)
    with torch.no_grad():
        base.weight[:, ::3] = 0  # some pruned positions
    layer = DeltaLinear(base, k, dtype)
    with torch.no_grad():
        layer.indices.copy_(torch.randperm(72)[:k].to(torch.int32))
        layer.delta.normal_()
    return layer


def _dense_reference(layer: DeltaLinear) -> torch.Tensor:
    w = layer.base.weight.detach().float().clone().view(-1)
    w[layer.indices.long()] += layer.delta.detach()
    return w.view(layer.shape)


def test_index_dtype_switches_at_2_pow_31():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64


def test_bitmap_round_trip():
    mask = torch.rand(7, 13) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (91 + 7) // 8
    assert torch.equal(unpack_bits(bits, 91).view(7, 13), mask)


def test_forward_and_backward_match_a_dense_linear():
    layer = _layer()
    w_ref = _dense_reference(layer).requires_grad_(True)
    x = torch.randn(3, 5, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    seen = []
    layer.observer = seen.append
    y = layer(x)
    y_ref = F.linear(x_ref, w_ref, layer.base.bias.detach())
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.delta.grad, w_ref.grad.view(-1)[layer.indices.long()])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], w_ref.grad)  # the observer got the dense weight gradient
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad
    assert layer.base.bias.grad is None


def test_dropped_delta_returns_base_bit_for_bit():
    layer = _layer(dtype=torch.bfloat16)
    with torch.no_grad():
        layer.delta.mul_(1e-3)
        layer.delta[:7] = 0  # drop seven entries
    w = layer.effective_weight(torch.bfloat16).view(-1)
    base = layer.base.weight.detach().view(-1)
    dropped = layer.indices[:7].long()
    assert torch.equal(w[dropped], base[dropped])
    untouched = torch.ones(72, dtype=torch.bool)
    untouched[layer.indices.long()] = False
    assert torch.equal(w[untouched], base[untouched])
    with torch.no_grad():
        layer.delta.zero_()
    assert torch.equal(layer.effective_weight(torch.bfloat16), layer.base.weight.detach())
    assert torch.equal(layer.effective_weight(torch.float32), layer.base.weight.detach().float())


def test_repruned_positions_read_zero_and_base_is_unchanged():
    layer = _layer()
    before = layer.base.weight.detach().clone()
    free = [p for p in range(72) if p not in set(layer.indices.tolist()) and before.view(-1)[p] != 0][:3]
    layer.repruned = torch.tensor(free)
    w = layer.effective_weight(torch.float32).view(-1)
    assert torch.equal(w[free], torch.zeros(3))
    assert torch.equal(layer.base.weight.detach(), before)
    assert layer.zero_in_base(torch.tensor(free)).all()


def test_nf4_base_dequantizes_in_forward():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    linear = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight[:, 1::2] = 0
    q = quantize_nf4(linear)
    assert type(q.weight).__name__ == "Params4bit" and q.weight.dtype == torch.uint8
    layer = DeltaLinear(q, 16, torch.float32, pack_bits(linear.weight.detach() != 0))
    with torch.no_grad():
        layer.indices.copy_(torch.arange(0, 512, 32, dtype=torch.int32))
        layer.delta.normal_()
    deq = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert (deq - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()  # 4-bit: coarse
    ref = deq.clone().view(-1)
    ref[layer.indices.long()] += layer.delta.detach()
    x = torch.randn(4, 64)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, ref.view(8, 64)))
    y.sum().backward()
    assert layer.delta.grad is not None and q.weight.grad is None
    assert torch.equal(layer.input_nonzero(), linear.weight != 0)


def test_sampled_gradient_outside_windows_matches_dense():
    layer = _layer(k=30, bias=False)
    w_ref = _dense_reference(layer).requires_grad_(True)
    x = torch.randn(2, 7, 12)
    grad = torch.randn(2, 7, 6)
    layer(x).backward(grad)  # no observer: the SDDMM path on CPU float32
    F.linear(x, w_ref).backward(grad)
    torch.testing.assert_close(layer.delta.grad, w_ref.grad.view(-1)[layer.indices.long()])
