"""`sparsetune export` round trips on tiny pruned models: every format and dtype gives bit-identical weights and
identical logits, and the files have the exact compressed-tensors / CUTLASS layouts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import bits, make_pruned_dir, random_text
from safetensors.torch import load_file
from torch.nn import functional as F

import sparsetune
from sparsetune.export import module_bytes, print_size_comparison, read_export_format, size_comparison, tensor_bytes
from sparsetune.export.codecs import bitmask_compress, nm_group_violations, pack_bitmask, unpack_bitmask
from sparsetune.export.config import ExportConfig
from sparsetune.export.writer import run_export
from sparsetune.loading import load_tokenizer


def assert_same_model(got, want):
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    for key, tensor in want_sd.items():
        assert got_sd[key].dtype == tensor.dtype, key
        assert torch.equal(bits(got_sd[key]), bits(tensor)), key
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)


CASES = [
    ("sparse-bitmask", "unstructured", "float32"),
    ("sparse-bitmask", "unstructured", "bfloat16"),
    ("sparse-bitmask", "unstructured", "float16"),
    ("sparse-24-bitmask", "2:4", "float32"),
    ("sparse-24-bitmask", "2:4", "bfloat16"),
    ("sparse-24-bitmask", "2:4", "float16"),
    ("semi-structured-2:4", "2:4", "float32"),
    ("semi-structured-2:4", "2:4", "bfloat16"),
    ("semi-structured-2:4", "2:4", "float16"),
    ("dense", "unstructured", "bfloat16"),
]


@pytest.mark.parametrize("fmt,pattern,dtype", CASES)
def test_round_trip_is_bit_identical(fmt, pattern, dtype, tmp_path, tiny_tokenizer):
    # intermediate 100: down_proj has 100 input columns (a partial bitmask byte, and CUTLASS padding to 128).
    src = make_pruned_dir(
        tmp_path / "src", tiny_tokenizer, pattern, dtype, tie=dtype == "bfloat16", intermediate_size=100
    )
    out = tmp_path / "out"
    report = run_export(ExportConfig(model=str(src), output=str(out), format=fmt))
    assert report["dtype"] == dtype
    assert read_export_format(out) == (None if fmt == "dense" else fmt)
    got = sparsetune.load(str(out), dtype=dtype)
    want = sparsetune.load(str(src), dtype=dtype)
    assert_same_model(got, want)
    if dtype == "bfloat16":  # tied embeddings stay tied
        assert got.lm_head.weight is got.model.embed_tokens.weight
    if fmt != "dense":
        assert report["modules_compressed"] == 14 and report["bytes_written"] < report["bytes_dense"]
        # the tokenizer travels with the weights, so eval/prune can read the dir on its own
        tokenizer = load_tokenizer(str(out))
        assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
        text = random_text(60)
        assert tokenizer(text).input_ids == tiny_tokenizer(text).input_ids
        assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask", "semi-structured-2:4"])
def test_negative_zeros_load_back_as_positive_zeros_and_nothing_else_changes(fmt, tmp_path, tiny_tokenizer):
    """Pruners that multiply by the mask leave -0.0 in pruned slots. The compressed formats store only values
    != 0 (compressed-tensors' rule), so those load back as +0.0: the one bit-level change, with equal logits."""
    pattern = "unstructured" if fmt == "sparse-bitmask" else "2:4"
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, pattern, "bfloat16", tie=True, multiply=True)
    out = tmp_path / "out"
    run_export(ExportConfig(model=str(src), output=str(out), format=fmt))
    got, want = sparsetune.load(str(out), dtype="bfloat16"), sparsetune.load(str(src), dtype="bfloat16")
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    negative_zeros = 0
    for key, tensor in want_sd.items():
        assert got_sd[key].dtype == tensor.dtype, key
        changed = bits(got_sd[key]).view(torch.int16) != bits(tensor).view(torch.int16)
        sign_only = (tensor == 0) & torch.signbit(tensor) & ~torch.signbit(got_sd[key]) & (got_sd[key] == 0)
        assert torch.equal(changed, changed & sign_only), key  # nothing but -0.0 -> +0.0
        negative_zeros += int(changed.sum())
    assert negative_zeros > 1000  # about half the pruned slots
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)


def test_sparse_bitmask_layout_matches_compressed_tensors(tmp_path, tiny_tokenizer):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, dtype="bfloat16", tie=True, intermediate_size=100)
    out = tmp_path / "out"
    run_export(ExportConfig(model=str(src), output=str(out), format="sparse-bitmask"))
    dense = load_file(str(src / "model.safetensors"))
    files = load_file(str(out / "model.safetensors"))
    m = "model.layers.1.mlp.down_proj"
    w = dense[f"{m}.weight"]
    assert f"{m}.weight" not in files
    assert files[f"{m}.shape"].dtype == torch.int64 and files[f"{m}.shape"].tolist() == [64, 100]
    assert files[f"{m}.compressed"].dtype == torch.bfloat16
    assert torch.equal(files[f"{m}.compressed"], w[w != 0])  # row-major non-zeros
    assert files[f"{m}.bitmask"].dtype == torch.uint8 and files[f"{m}.bitmask"].shape == (64, 13)
    counts = (w != 0).sum(1)
    assert torch.equal(files[f"{m}.row_offsets"], torch.cumsum(counts, 0) - counts)
    assert "model.embed_tokens.weight" in files and "lm_head.weight" not in files  # tied: stored once, dense
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["version"] == "0.14.0.1"
    sc = qc["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    assert sc["sparsity_structure"] == "unstructured" and sc["registry_requires_subclass"] is False
    assert sc["global_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_bitmask_bit_order_is_little_endian_per_row():
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 1] = mask[0, 8] = mask[1, 0] = True
    packed = pack_bitmask(mask)
    assert packed.tolist() == [[0b10, 0b1], [0b1, 0]]
    assert torch.equal(unpack_bitmask(packed, 9), mask)
    w = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]])
    parts = bitmask_compress(w)
    assert parts["compressed"].tolist() == [2.0, 3.0, 4.0] and parts["row_offsets"].tolist() == [0, 1]


def test_sparse24_layout_and_groups_with_fewer_than_two_nonzeros(tmp_path, tiny_tokenizer):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, "2:4", "bfloat16")
    from safetensors.torch import save_file

    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][0, :8] = 0  # two all-zero groups
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    run_export(ExportConfig(model=str(src), output=str(out), format="sparse-24-bitmask"))
    files = load_file(str(out / "model.safetensors"))
    m = "model.layers.0.self_attn.q_proj"
    assert files[f"{m}.shape"].shape == (2, 1) and files[f"{m}.shape"].flatten().tolist() == [64, 64]
    assert files[f"{m}.compressed"].shape == (64, 32) and files[f"{m}.compressed"].dtype == torch.bfloat16
    assert files[f"{m}.bitmask"].shape == (64, 8) and f"{m}.row_offsets" not in files
    mask = unpack_bitmask(files[f"{m}.bitmask"], 64)
    assert bool((mask.view(64, 16, 4).sum(-1) == 2).all())  # exactly two slots per group, zeros fill in
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["sparsity_structure"]
        == "2:4"
    )
    got = sparsetune.load(str(out), dtype="bfloat16")
    assert torch.equal(bits(got.state_dict()[f"{m}.weight"]), bits(weights[f"{m}.weight"]))


def test_semi_structured_files_hold_pytorch_cutlass_packing(tmp_path, tiny_tokenizer):
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, "2:4", "bfloat16", intermediate_size=100)
    out = tmp_path / "out"
    run_export(ExportConfig(model=str(src), output=str(out), format="semi-structured-2:4"))
    dense = load_file(str(src / "model.safetensors"))
    files = load_file(str(out / "model.safetensors"))
    m = "model.layers.0.mlp.gate_proj"  # [100, 64]: rows padded to 128
    padded = F.pad(dense[f"{m}.weight"], (0, 0, 0, 28))
    packed, meta = sparse_semi_structured_from_dense_cutlass(padded)
    assert torch.equal(files[f"{m}.packed"], packed) and torch.equal(files[f"{m}.meta"], meta)
    assert files[f"{m}.packed"].shape == (128, 32) and files[f"{m}.meta"].dtype == torch.int16
    assert files[f"{m}.shape"].tolist() == [100, 64]
    meta_json = json.loads((out / "sparsetune_config.json").read_text())
    assert meta_json["format"] == "semi-structured-2:4" and meta_json["dtype"] == "bfloat16"
    assert meta_json["layout"]["kernel"] == "cutlass"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_semi_structured_true_on_cpu_decompresses_with_one_info_line(tmp_path, tiny_tokenizer, caplog):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, "2:4", "bfloat16")
    out = tmp_path / "out"
    run_export(ExportConfig(model=str(src), output=str(out), format="semi-structured-2:4"))
    with caplog.at_level("INFO", logger="sparsetune.export.loader"):
        model = sparsetune.load(str(out), dtype="bfloat16", device="cpu", semi_structured=True)
    lines = [r for r in caplog.records if "semi_structured" in r.getMessage()]
    assert len(lines) == 1 and "compute capability" in lines[0].getMessage()
    assert type(model.model.layers[0].self_attn.q_proj.weight.data) is torch.Tensor
    assert nm_group_violations(model.model.layers[0].self_attn.q_proj.weight) == 0


def test_sharded_export_round_trips(tmp_path, tiny_tokenizer):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, dtype="bfloat16", tie=True)
    out = tmp_path / "out"
    report = run_export(ExportConfig(model=str(src), output=str(out), format="sparse-bitmask", max_shard_size="40KB"))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert report["shards"] == len(shards) > 2 and "model.safetensors" not in shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    stored = {k for s in shards for k in load_file(str(out / s))}
    assert set(index["weight_map"]) == stored
    for module in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"):  # parts share a shard
        assert len({index["weight_map"][f"{module}.{p}"] for p in ("shape", "compressed", "bitmask")}) == 1
    assert_same_model(sparsetune.load(str(out), dtype="bfloat16"), sparsetune.load(str(src), dtype="bfloat16"))


def test_dense_modules_and_ignore_list_stay_dense(tmp_path, tiny_tokenizer):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, dtype="bfloat16", skip=("layers.1.self_attn.q_proj",))
    out = tmp_path / "out"
    report = run_export(ExportConfig(model=str(src), output=str(out), format="sparse-bitmask", ignore=["v_proj$"]))
    files = load_file(str(out / "model.safetensors"))
    assert "model.layers.1.self_attn.q_proj.weight" in files  # density 1.0 > 0.9
    assert "model.layers.0.self_attn.v_proj.weight" in files and "model.layers.0.self_attn.k_proj.bitmask" in files
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["ignore"]
    assert ignore == sorted(
        [
            "lm_head",
            "model.layers.1.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.v_proj",
        ]
    )
    assert report["modules_compressed"] == 11
    assert_same_model(sparsetune.load(str(out), dtype="bfloat16"), sparsetune.load(str(src), dtype="bfloat16"))


def test_size_helpers_measure_compressed_modules(tmp_path, tiny_tokenizer, capsys):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, "2:4", "bfloat16")
    out = tmp_path / "out"
    run_export(ExportConfig(model=str(src), output=str(out), format="sparse-24-bitmask"))
    sizes = tensor_bytes(out)
    m = "model.layers.0.mlp.down_proj"
    assert module_bytes(sizes, [m]) == 64 * 64 * 2 + 64 * 16 + 16  # values + bitmask + shape
    s = print_size_comparison(src, out)
    assert s["module_ratio"] == pytest.approx((0.5 * 2 + 1 / 8) / 2, abs=0.01)
    assert s == size_comparison(src, out) and "on disk" in capsys.readouterr().out
