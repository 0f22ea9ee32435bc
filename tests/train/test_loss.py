"""The chunked, checkpointed training loss equals plain cross-entropy over full logits, in value and gradient."""

from __future__ import annotations

import pytest
import torch
from architectures import COMMON, FAMILY_CONFIGS
from helpers import make_tiny_model
from torch import nn

from sparsetune.train.examples import IGNORE
from sparsetune.train.loss import token_nll_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_nll_sum(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    labels = batch["labels"][:, 1:].reshape(-1)
    return nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def make_batch(vocab: int, ignore_prompt: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a padded row
    labels = ids.clone()
    labels[mask == 0] = IGNORE
    if ignore_prompt:
        labels[:, :12] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk", [7, 0])  # 7: several chunks, the last one partial; 0: all tokens at once
@pytest.mark.parametrize("ignore_prompt", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_matches_full_logits(ignore_prompt, tie, chunk):
    model = make_tiny_model("llama", tie=tie).float()
    model.train()
    batch = make_batch(model.config.vocab_size, ignore_prompt)
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].mlp.down_proj.weight]
    params.append(model.get_output_embeddings().weight)

    want = reference_nll_sum(model, batch)
    want_grads = torch.autograd.grad(want, params)
    got = token_nll_sum(model, batch, chunk)
    got_grads = torch.autograd.grad(got, params)

    assert isinstance(model.get_output_embeddings(), nn.Linear)  # the head is back in place
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_chunked_loss_without_labels_is_zero_and_backpropagates():
    model = make_tiny_model("llama").float()
    batch = make_batch(model.config.vocab_size, ignore_prompt=False)
    batch["labels"][:] = IGNORE
    loss = token_nll_sum(model, batch)
    assert float(loss.detach()) == 0.0
    loss.backward()  # no label anywhere must not break the training step


def test_chunked_loss_through_a_lora_model():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("llama").float()
    batch = make_batch(model.config.vocab_size, ignore_prompt=True)
    want = reference_nll_sum(model, batch)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    got = token_nll_sum(lora, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # LoRA B starts at 0: same function
    got.backward()
    assert any(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


@pytest.mark.parametrize(
    "family,overrides",
    [
        *((f, {}) for f in FAMILY_CONFIGS),
        ("gemma2", {"final_logit_softcapping": 0.1}),  # a cap well inside the tiny model's logits
        ("granite", {"logits_scaling": 4.0}),
        ("cohere", {"logit_scale": 0.5}),
    ],
)
def test_chunked_loss_matches_full_logits_in_every_family(family, overrides):
    """The loss of each family's own forward pass, whatever its head does after the matmul (Gemma-2's soft-cap,
    Granite's and Cohere's scales): the model's hidden states reach the head, and the head's post-processing is
    applied to each chunk's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILY_CONFIGS.get(family, {}), **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # eval: no dropout draws
    batch = make_batch(model.config.vocab_size, ignore_prompt=True)
    with torch.no_grad():
        want = reference_nll_sum(model, batch)
        got = token_nll_sum(model, batch, 7)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
