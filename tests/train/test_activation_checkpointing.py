"""Activation checkpointing (`--activation-checkpointing`, on by default) and the loss chunk (`--loss-chunk-tokens`):
every training method gives the same losses and weights with checkpointing on and off, bit for bit; with it on
every decoder block really runs again in backward and the forward pass saves fewer tensors; off, nothing changes;
resume works across the switch and from checkpoints written before the two settings existed."""

from __future__ import annotations

import json

import pytest
import torch
from architectures import FAMILY_CONFIGS, make_family_model
from helpers import load_weights, make_pruned, make_tokenizer, smet_settings, write_alpaca, write_text
from helpers import seft_settings as tiny_seft_settings

from sparsetune import structure
from sparsetune.errors import SparsetuneError
from sparsetune.train.activations import Checkpointing
from sparsetune.train.loss import token_nll_sum
from sparsetune.train.seft import FinetuneRun
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.smet import PretrainRun
from sparsetune.train.smet_config import SmetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class Probe:
    """Counts, during a run, the calls of every decoder block's `mlp` (a replay in backward is a second call) and the
    bytes autograd saves for backward outside any checkpoint during the training steps' forward passes."""

    def __init__(self) -> None:
        self.mlp_calls = 0
        self.saved_bytes = 0
        self.forwards = 0

    def attach(self, model: torch.nn.Module) -> None:
        def count(*_args) -> None:
            if torch.is_grad_enabled():  # not the no-grad validation passes; a replay in backward runs with grad
                self.mlp_calls += 1

        for layer in structure.decoder_layers(model):
            layer.mlp.register_forward_pre_hook(count)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.saved_bytes += tensor.numel() * tensor.element_size()
        return tensor


def probed(base: type) -> type:
    class Probed(base):
        def load(self) -> None:
            super().load()
            self.probe = Probe()
            self.probe.attach(self.model)

        def nll(self, batch):
            self.probe.forwards += 1
            with torch.autograd.graph.saved_tensors_hooks(self.probe.pack, lambda t: t):
                return super().nll(batch)

    return Probed


def seft_settings(pruned, data, out, **extra) -> dict:
    seft = {"grad_accum": 2, "delta_rank": 4, "reselect_every": 4, "select_window": 2}
    return tiny_seft_settings(pruned, data, out, **{**seft, **extra})


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def run_pair(make_run, out_root, name: str) -> tuple[dict, dict]:
    """The run with checkpointing on and off: (report, losses, weights, probe) of each."""
    results = {}
    for on in (True, False):
        out = out_root / f"{name}-{'on' if on else 'off'}"
        run = make_run(out, on)
        report = run.run()
        results[on] = {
            "report": report,
            "losses": losses(out),
            "weights": load_weights(out, "*.safetensors"),
            "config": json.loads((out / "config.json").read_text()),
            "probe": run.probe,
        }
    return results[True], results[False]


def assert_same_run(on: dict, off: dict) -> None:
    assert on["losses"] == off["losses"]  # bit for bit: the recomputation replays the same operations
    assert on["weights"].keys() == off["weights"].keys()
    for name, tensor in on["weights"].items():
        assert torch.equal(tensor, off["weights"][name]), name
    assert on["config"] == off["config"]  # the saved model does not carry the switch


def assert_checkpointed(on: dict, off: dict, layers: int, mechanism: str = "transformers") -> None:
    """Each training forward pass runs every block once more in backward; untouched with the switch off."""
    p_on, p_off = on["probe"], off["probe"]
    assert p_on.forwards == p_off.forwards > 0
    assert p_off.mlp_calls == layers * p_off.forwards  # off: one call per block and forward pass
    assert p_on.mlp_calls == 2 * p_off.mlp_calls  # on: and one replay in backward
    # what the blocks would save is not held between forward and backward; the rest (the blocks' inputs, the final
    # norm, the loss chunks' inputs) is the same, a small part of it in these 2-block models
    assert p_on.saved_bytes < 0.2 * p_off.saved_bytes  # measured 0.07-0.14
    memory = lambda r: r["report"].get("finetune_history", [{}])[-1].get("memory") or r["report"]["memory"]  # noqa: E731
    assert memory(on)["activation_checkpointing"] == mechanism
    assert memory(off)["activation_checkpointing"] == "off"
    assert memory(on)["loss_chunk_tokens"] == memory(off)["loss_chunk_tokens"] == 256


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ac")
    return {
        "pruned": make_pruned(root),
        "pruned_24": make_pruned(root, "2:4"),
        "text": write_text(root / "t.txt"),
        "alpaca": write_alpaca(root / "a.json"),
        "root": root,
    }


SEFT_CASES = {
    "seft": {"method": "seft"},
    "seft-reactivate-alpaca": {"method": "seft", "reactivate": True, "data": "alpaca", "seqlen": 96},
    "seft-bf16": {"method": "seft", "dtype": "bfloat16"},
    "seft-nf4": {"method": "seft", "base_dtype": "nf4"},
    "masked-ft": {"method": "masked-ft"},
    "masked-ft-2of4": {"method": "masked-ft", "pruned": "pruned_24"},
    "lora-reprune": {"method": "lora-reprune"},
    "granet-wanda": {"method": "granet", "target_sparsity": 0.6, "granet_interval": 3, "granet_score": "wanda"},
    "masked-ft-squarehead": {"method": "masked-ft", "distill_loss": "squarehead"},
}


@pytest.mark.parametrize("case", list(SEFT_CASES))
def test_seft_methods_equal_with_checkpointing_on_and_off(inputs, tmp_path, case):
    extra = dict(SEFT_CASES[case])
    pruned = inputs[extra.pop("pruned", "pruned")]
    data = inputs["alpaca"] if extra.pop("data", None) == "alpaca" else inputs["text"]
    # the distillation objective replaces `nll` in the training steps (the probe sees no training forward pass),
    # and its 8 steps need not lower the cross-entropy
    distilled = "distill_loss" in extra

    def make(out, on):
        return probed(FinetuneRun)(
            SeftConfig(**seft_settings(pruned, data, out, activation_checkpointing=on, **extra)), show_progress=False
        )

    on, off = run_pair(make, tmp_path, case)
    assert_same_run(on, off)
    if not distilled:
        assert_checkpointed(on, off, layers=2)
        assert on["losses"][-1] < on["losses"][0]  # it trained


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_smet_equal_with_checkpointing_on_and_off(inputs, tmp_path, growth):
    tok = inputs["root"] / "tok"
    if not tok.exists():
        make_tokenizer().save_pretrained(tok)

    def make(out, on):
        cfg = smet_settings(tok, inputs["text"], out, activation_checkpointing=on, growth=growth, eval_every=4)
        return probed(PretrainRun)(SmetConfig(**cfg), show_progress=False)

    on, off = run_pair(make, tmp_path, f"smet-{growth}")
    assert_same_run(on, off)
    assert_checkpointed(on, off, layers=2)
    assert on["report"]["summary"]["final_val_loss"] == off["report"]["summary"]["final_val_loss"]


def test_torch_checkpoint_where_transformers_does_not_apply(inputs, tmp_path, monkeypatch):
    """A model whose blocks are not transformers' GradientCheckpointingLayer (remote code, say): each block's forward
    is wrapped in torch's checkpoint instead, with the same effect and result; the end of training unwraps it."""
    from sparsetune.train import activations

    monkeypatch.setattr(activations, "_hf_layer_class", lambda: type("NoSuchLayer", (), {}))
    wrapped: list[torch.nn.Module] = []

    class Watch(probed(FinetuneRun)):
        def end_checkpointing(self) -> None:
            layers = list(structure.decoder_layers(self.model))
            if self.activation_checkpointing is not None:
                assert all("forward" in layer.__dict__ for layer in layers)  # the wrapper sits on the instance
                assert not any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
            super().end_checkpointing()
            wrapped.extend(layers)

    def make(out, on):
        return Watch(SeftConfig(**seft_settings(inputs["pruned"], inputs["text"], out, activation_checkpointing=on)))

    on, off = run_pair(make, tmp_path, "torch")
    assert_same_run(on, off)
    assert_checkpointed(on, off, layers=2, mechanism="torch")
    assert wrapped and not any("forward" in layer.__dict__ for layer in wrapped)  # the class's forward again


def test_transformers_checkpointing_is_switched_off_after_training(inputs, tmp_path):
    seen = {}

    class Watch(FinetuneRun):
        def end_checkpointing(self) -> None:
            layers = list(structure.decoder_layers(self.model))
            seen["during"] = [layer.gradient_checkpointing for layer in layers]
            super().end_checkpointing()
            seen["after"] = [layer.gradient_checkpointing for layer in layers]

    Watch(SeftConfig(**seft_settings(inputs["pruned"], inputs["text"], tmp_path / "o")), show_progress=False).run()
    assert seen == {"during": [True, True], "after": [False, False]}


class Stop(Exception):
    pass


def stop_after(step: int) -> type:
    class StopAfter(FinetuneRun):
        def train_step(self, s):
            if s == step:
                raise Stop
            return super().train_step(s)

    return StopAfter


@pytest.mark.parametrize("first,second", [(True, False), (False, True)])
def test_resume_across_the_switch_is_bit_identical(inputs, tmp_path, first, second):
    """The switch is not part of a checkpoint's identity: a run checkpointed with it on resumes with it off (and
    the other way round) and ends where an uninterrupted run ends."""
    base = seft_settings(inputs["pruned"], inputs["text"], tmp_path / "ref", steps=10, checkpoint_every=3)
    base["reactivate"] = True
    FinetuneRun(SeftConfig(**{**base, "checkpoint_dir": str(tmp_path / "ref.ckpt")}), show_progress=False).run()
    cut = {**base, "output": str(tmp_path / "cut"), "checkpoint_dir": str(tmp_path / "cut.ckpt")}
    with pytest.raises(Stop):
        stop_after(7)(SeftConfig(**cut, activation_checkpointing=first), show_progress=False).run()
    state = torch.load(tmp_path / "cut.ckpt" / "checkpoint" / "state.pt", weights_only=True)
    assert state["state"]["step"] == 6
    FinetuneRun(SeftConfig(**cut, activation_checkpointing=second, resume=True), show_progress=False).run()
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    ref, out = load_weights(tmp_path / "ref", "*.safetensors"), load_weights(tmp_path / "cut", "*.safetensors")
    assert all(torch.equal(ref[k], out[k]) for k in ref)


def test_checkpoint_from_before_the_settings_resumes_with_the_old_loss_chunk(inputs, tmp_path):
    """A checkpoint whose identity predates `loss_chunk_tokens` ran with chunks of 256: it resumes with that value
    and is refused with another."""
    cut = seft_settings(inputs["pruned"], inputs["text"], tmp_path / "cut", steps=6, checkpoint_every=2)
    cut["checkpoint_dir"] = str(tmp_path / "cut.ckpt")
    with pytest.raises(Stop):
        stop_after(3)(SeftConfig(**cut), show_progress=False).run()
    path = tmp_path / "cut.ckpt" / "checkpoint" / "state.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["identity"]["loss_chunk_tokens"] == 256 and "activation_checkpointing" not in saved["identity"]
    del saved["identity"]["loss_chunk_tokens"]  # as written before the setting existed
    torch.save(saved, path)
    with pytest.raises(SparsetuneError, match=r"belongs to another run \(loss_chunk_tokens differ\)"):
        FinetuneRun(SeftConfig(**cut, loss_chunk_tokens=128, resume=True), show_progress=False).run()
    report = FinetuneRun(SeftConfig(**cut, resume=True), show_progress=False).run()
    assert report["summary"]["steps"] == 6


def test_whole_logits_loss_trains_and_is_recorded(inputs, tmp_path):
    """--loss-chunk-tokens 0: the head runs on all label tokens at once; the losses match the chunked run's to
    float rounding (the sums are grouped differently), and the report and recipe say which ran."""
    runs = {}
    for chunk in (0, 256, 7):
        out = tmp_path / f"c{chunk}"
        cfg = SeftConfig(**seft_settings(inputs["pruned"], inputs["text"], out, loss_chunk_tokens=chunk))
        report = FinetuneRun(cfg, show_progress=False).run()
        assert report["finetune_history"][-1]["memory"]["loss_chunk_tokens"] == chunk
        assert report["summary"]["loss_chunk_tokens"] == chunk
        assert report["summary"]["activation_checkpointing"] == "transformers"
        assert report["finetune_history"][-1]["settings"]["loss_chunk_tokens"] == chunk
        assert f"loss_chunk_tokens: {chunk}" in (out / "recipe.yaml").read_text()
        runs[chunk] = losses(out)
    for chunk in (256, 7):
        assert max(abs(a - b) / b for a, b in zip(runs[chunk], runs[0], strict=True)) < 1e-6  # measured 8.9e-8


@pytest.mark.dist
@pytest.mark.parametrize("method", ["seft", "lora-reprune"])
def test_two_processes_equal_with_checkpointing_on_and_off(inputs, tmp_path, method):
    """Under torchrun (gloo, 2 processes), where seft's selection windows all-reduce inside backward: the same
    losses and weights with checkpointing on and off, bit for bit."""
    import os
    import shutil
    import subprocess
    import sys

    from helpers import ONE_THREAD_ENV

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, **ONE_THREAD_ENV, "ACCELERATE_USE_CPU": "1"}
    args = ["seft", str(inputs["pruned"]), "--data", str(inputs["text"]), "--seqlen", "32", "--batch-size", "4",
            "--steps", "5", "--lr", "5e-3", "--delta-rank", "4", "--reselect-every", "3", "--select-window", "2",
            "--method", method, *(["--reactivate"] if method == "seft" else [])]  # fmt: skip
    runs = {}
    for switch in ("--activation-checkpointing", "--no-activation-checkpointing"):
        out = tmp_path / switch.strip("-")
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sparsetune", *args, switch, "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[switch] = (losses(out), load_weights(out, "*.safetensors"))
    (on_losses, on), (off_losses, off) = runs.values()
    assert on_losses == off_losses
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_every_family_replays_its_blocks_and_gets_the_same_gradients(family):
    """Every decoder family of the architecture matrix (MoE and GPT-2's Conv1D included): with its blocks
    checkpointed by transformers, the loss and every parameter's gradient are those without, bit for bit (in
    training mode: GPT-2's and OPT's dropout draws the same masks in the replay), and every block runs again."""
    model = make_family_model(family).train()
    ids = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    layers = list(structure.decoder_layers(model))
    calls = [0] * len(layers)

    def counter(i: int):
        def count(module, _args) -> None:
            if torch.is_grad_enabled():
                calls[i] += 1

        return count

    for i, layer in enumerate(layers):
        for module in layer.modules():
            if module is not layer and not list(module.children()):
                module.register_forward_pre_hook(counter(i))

    def step(on: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int], str]:
        switch = Checkpointing(model) if on else None
        calls[:] = [0] * len(layers)
        torch.manual_seed(1)
        loss = token_nll_sum(model, batch, 16)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        mechanism = switch.mechanism if switch else "off"
        if switch:
            switch.disable()
        return loss.detach(), grads, list(calls), mechanism

    loss_on, grads_on, calls_on, mechanism = step(True)
    loss_off, grads_off, calls_off, _ = step(False)
    assert mechanism == "transformers"
    # every block runs again in backward: up to its last op that saves a tensor for backward (torch's early stop
    # skips the rest, e.g. Phi-3's trailing residual dropout)
    for on, off in zip(calls_on, calls_off, strict=True):
        assert 0 < off < on <= 2 * off
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    for name, grad in grads_on.items():
        assert torch.equal(grad, grads_off[name]), name
