"""seft's baselines beyond the Llama layout: masked-ft and lora-reprune on fused 3-D expert parameters (Mixtral)
and on GPT-2's Conv1D (stored [in, out]), with masks drawn here by hand (no prune engine involved) or by the prune
library where the re-prune needs its report."""

from __future__ import annotations

import json

import pytest
import torch
from architectures import make_family_model
from helpers import make_tokenizer, write_text

from sparsetune.train.seft import run_seft
from sparsetune.train.seft_config import SeftConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"seqlen": 32, "batch_size": 4, "steps": 3, "lr": 1e-2}


def _sparse_params(model) -> dict[str, torch.Tensor]:
    """The stored tensors of the matrices under test, by type: Conv1D weights and fused 3-D expert parameters."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            out[f"{name}.weight"] = module.weight
        for param in ("gate_up_proj", "down_proj"):
            p = module._parameters.get(param)
            if p is not None and p.dim() == 3:
                out[f"{name}.{param}"] = p
    return out


def _two_of_four(matrix: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of each row of an [out, in] matrix holds exactly 2 non-zeros."""
    return bool(((matrix != 0).reshape(matrix.shape[0], -1, 4).sum(dim=2) == 2).all())


def _hand_pruned_dir(tmp_path, family: str):
    """`family`'s tiny model with a random half of every Conv1D weight / fused expert parameter zeroed in its
    stored layout (no sparsity report: the start comes from the zeros). Returns (dir, name -> pruned positions)."""
    model = make_family_model(family)
    gen = torch.Generator().manual_seed(1)
    pruned = {}
    with torch.no_grad():
        for name, param in _sparse_params(model).items():
            drop = torch.rand(param.shape, generator=gen) < 0.5
            param.masked_fill_(drop, 0.0)
            pruned[name] = drop
    assert pruned
    path = tmp_path / f"{family}-pruned"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path, pruned


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize(
    ("family", "kinds"), [("mixtral", {"expert": 2 * 2 * 4}), ("gpt2", {"conv1d": 2 * 4})], ids=["mixtral", "gpt2"]
)
def test_masked_ft_keeps_every_pruned_position_zero_and_trains_the_kept_ones(tmp_path, family, kinds):
    pruned_dir, pruned = _hand_pruned_dir(tmp_path, family)
    out = tmp_path / "ft"
    data = write_text(tmp_path / "t.txt")
    cfg = SeftConfig(model=str(pruned_dir), output=str(out), data=str(data), method="masked-ft", **TINY)
    report = run_seft(cfg, show_progress=False)
    before, after = _load(pruned_dir), _load(out)
    for name, drop in pruned.items():
        assert torch.equal(after[name][drop], torch.zeros(int(drop.sum()))), name  # pruned: exactly 0
        kept_changed = (after[name] != before[name]) & ~drop
        if after[name].dim() == 3:  # every expert's slice trained, under its own mask
            assert all(bool(kept_changed[e].any()) for e in range(after[name].shape[0])), name
        else:
            assert bool(kept_changed.any()), name
        assert int((after[name] != 0).sum()) == int((~drop).sum()), name  # no kept weight became 0
    # nothing but the sparse matrices trained: every other tensor is as it was
    others = [k for k in before if k not in pruned]
    assert others and all(torch.equal(after[k], before[k]) for k in others)
    assert report["summary"]["sparse_matrices"] == kinds
    assert report["summary"]["sparsity_before"] == report["summary"]["sparsity_after"]
    assert report["summary"]["final_loss"] != report["summary"]["first_loss"]


def _engine_pruned_dir(tmp_path, family: str, **target) -> tuple:
    from sparsetune.prune.api import run_prune
    from sparsetune.prune.config import PruneConfig

    dense = tmp_path / f"{family}-dense"
    make_family_model(family).save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    out = tmp_path / f"{family}-pruned"
    run_prune(PruneConfig(model=str(dense), output=str(out), method="magnitude", **target), show_progress=False)
    return out, json.loads((out / "sparsity_report.json").read_text())


def test_lora_reprune_on_moe_trains_the_linears_and_leaves_the_expert_slices_as_pruned(tmp_path):
    pruned_dir, prune_report = _engine_pruned_dir(tmp_path, "mixtral", pattern="2:4")
    out = tmp_path / "lora"
    data = write_text(tmp_path / "t.txt")
    cfg = SeftConfig(model=str(pruned_dir), output=str(out), data=str(data), method="lora-reprune", **TINY)
    report = run_seft(cfg, show_progress=False)
    before, after = _load(pruned_dir), _load(out)
    experts = [k for k, t in before.items() if ".experts." in k]
    assert experts and all(torch.equal(after[k], before[k]) for k in experts)  # frozen, bit for bit
    attention = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"]
    for key in attention:  # LoRA merged in, then re-pruned to exactly 2:4 along the input dim
        assert not torch.equal(after[key], before[key]), key
        assert _two_of_four(after[key]), key
    slices = [n for n in prune_report["modules"] if ".experts." in n]
    assert len(slices) == 2 * 2 * 4
    assert report["summary"]["frozen_sparse_matrices"] == len(slices)
    assert report["summary"]["lora_modules"] == len(attention)


def test_lora_reprune_wraps_gpt2_conv1d_and_restores_its_pattern(tmp_path):
    pruned_dir, _ = _engine_pruned_dir(tmp_path, "gpt2", pattern="2:4")
    out = tmp_path / "lora"
    data = write_text(tmp_path / "t.txt")
    cfg = SeftConfig(model=str(pruned_dir), output=str(out), data=str(data), method="lora-reprune", **TINY)
    report = run_seft(cfg, show_progress=False)
    before, after = _load(pruned_dir), _load(out)
    convs = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
    convs += [f"transformer.h.{i}.mlp.c_proj.weight" for i in range(2)]
    for key in convs:
        matrix = after[key].t()  # Conv1D stores [in, out]; N:M runs along the input dim of [out, in]
        assert not torch.equal(after[key], before[key]), key
        assert _two_of_four(matrix), key
    assert report["summary"]["frozen_sparse_matrices"] == 0
    assert report["summary"]["lora_modules"] == len(convs)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_smet_sparse_linears_are_named_as_the_model_names_them(family):
    from sparsetune.train.smet import sparse_linears

    model = make_family_model(family)
    named = dict(model.named_modules())
    want = {n for n, m in named.items() if isinstance(m, torch.nn.Linear) and ".layers." in n}  # not lm_head
    found = sparse_linears(model)
    assert set(found) == want and len(want) == 2 * (4 + (2 if family == "opt" else 3))
    assert all(found[n] is named[n] for n in want)


class _Interrupted(Exception):
    pass


def test_masked_ft_on_fused_experts_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    from sparsetune.train.seft import FinetuneRun

    class StopsAtStep4(FinetuneRun):
        def train_step(self, step: int):
            if step == 3:  # the checkpoint of step 2 was written when step 3's loss proved it sane
                raise _Interrupted
            return super().train_step(step)

    pruned_dir, _ = _hand_pruned_dir(tmp_path, "mixtral")
    data = write_text(tmp_path / "t.txt")
    base = {"model": str(pruned_dir), "data": str(data), "method": "masked-ft", **TINY, "steps": 5}
    run_seft(SeftConfig(**base, output=str(tmp_path / "ref")), show_progress=False)
    ckpt = {"checkpoint_every": 2, "checkpoint_dir": str(tmp_path / "ckpt")}
    with pytest.raises(_Interrupted):
        StopsAtStep4(SeftConfig(**base, output=str(tmp_path / "out"), **ckpt), show_progress=False).run()
    saved = tmp_path / "ckpt" / "checkpoint"
    assert torch.load(saved / "state.pt", weights_only=True)["state"]["step"] == 2
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(saved / "weights.safetensors"))
    run_seft(SeftConfig(**base, output=str(tmp_path / "out"), resume=True, **ckpt), show_progress=False)
    ref, resumed = _load(tmp_path / "ref"), _load(tmp_path / "out")
    assert set(ref) == set(resumed) and all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert any(not torch.equal(ref[k], v) for k, v in _load(pruned_dir).items())  # it trained


def test_the_end_of_run_check_counts_the_zeros_of_each_expert_slice(tmp_path):
    from sparsetune.errors import SparsetuneError
    from sparsetune.train.seft import FinetuneRun

    class ZeroesOneKeptExpertWeight(FinetuneRun):
        def finish(self):
            with torch.no_grad():  # what an overflow to exactly 0 would look like, in expert 2 of layer 1
                kept = self.model.model.layers[1].mlp.experts.down_proj[2]
                kept.view(-1)[int((kept.reshape(-1) != 0).nonzero()[0])] = 0.0
            return super().finish()

    pruned_dir, _ = _hand_pruned_dir(tmp_path, "mixtral")
    data = write_text(tmp_path / "t.txt")
    cfg = SeftConfig(model=str(pruned_dir), output=str(tmp_path / "o"), data=str(data), method="masked-ft", **TINY)
    with pytest.raises(SparsetuneError, match=r"model\.layers\.1\.mlp\.experts\.down_proj\[2\] with \d+ zeros"):
        ZeroesOneKeptExpertWeight(cfg, show_progress=False).run()
    assert not (tmp_path / "o").exists()


def test_a_conv1d_or_expert_slice_off_its_reported_count_is_refused():
    from sparsetune.errors import SparsetuneError
    from sparsetune.train.sparse_start import find_sparse_start

    model = make_family_model("gpt2")
    weight = model.transformer.h[0].attn.c_proj.weight
    with torch.no_grad():
        weight[:, ::2] = 0.0  # every other column of the stored [in, out] weight: 2048 zeros
    report = {"pattern": "unstructured", "modules": {"transformer.h.0.attn.c_proj": {"zeros": 2047}}}
    start = find_sparse_start(model, report)
    assert start.kind("transformer.h.0.attn.c_proj") == "conv1d" and start.active_counts == {
        "transformer.h.0.attn.c_proj": 64 * 64 - 2048
    }
    with pytest.raises(SparsetuneError, match=r"transformer\.h\.0\.attn\.c_proj \(conv1d\) holds 2048 non-zeros"):
        start.drifted()
    with pytest.raises(SparsetuneError, match=r"names transformer\.h\.0\.attn\.c_attnx, which is not a prunable"):
        find_sparse_start(model, {"modules": {"transformer.h.0.attn.c_attnx": {"zeros": 0}}})


def test_seft_on_moe_trains_the_linears_and_leaves_the_expert_slices_as_pruned(tmp_path, caplog):
    pruned_dir, _ = _engine_pruned_dir(tmp_path, "mixtral", pattern="2:4")
    out = tmp_path / "seft"
    data = write_text(tmp_path / "t.txt")
    cfg = SeftConfig(model=str(pruned_dir), output=str(out), data=str(data), method="seft", delta_rank=2,
                     reselect_every=2, select_window=1, **TINY)  # fmt: skip
    with caplog.at_level("WARNING"):
        report = run_seft(cfg, show_progress=False)
    assert sum("16 targeted expert matrices stay frozen" in r.getMessage() for r in caplog.records) == 1
    before, after = _load(pruned_dir), _load(out)
    experts = [k for k, t in before.items() if ".experts." in k]
    assert experts and all(torch.equal(after[k], before[k]) for k in experts)  # frozen, bit for bit
    attention = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"]
    assert any(not torch.equal(after[k], before[k]) for k in attention)  # the deltas trained and merged
    assert all(_two_of_four(after[k]) for k in attention)
    assert report["summary"]["sparsity"] == pytest.approx(report["summary"]["sparsity_before"], abs=0)


def test_seft_refuses_a_model_whose_targets_are_all_conv1d(tmp_path):
    from sparsetune.errors import SparsetuneError

    pruned_dir, _ = _engine_pruned_dir(tmp_path, "gpt2", sparsity=0.5)
    data = write_text(tmp_path / "t.txt")
    cfg = SeftConfig(model=str(pruned_dir), output=str(tmp_path / "seft"), data=str(data), method="seft", **TINY)
    with pytest.raises(SparsetuneError, match="targets are conv1d matrices only; use --method masked-ft"):
        run_seft(cfg, show_progress=False)
    assert not (tmp_path / "seft").exists()
