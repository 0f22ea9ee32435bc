"""Distillation's losses against values worked out by hand, the objective of a micro-batch against the plain token
loss, and the refusal of a teacher with another vocabulary or tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_tiny_model, make_tokenizer

from sparsetune.errors import SparsetuneError
from sparsetune.train.distill import (
    Distiller,
    Teacher,
    check_same_vocabulary,
    kl_sum,
    load_teacher,
    normalised_mse,
    source_model,
    squarehead_feature_loss,
)
from sparsetune.train.loss import token_nll_sum

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_of_hand_made_logits():
    # row 1: teacher softmax([ln 3, 0]) = [3/4, 1/4] against a uniform student [1/2, 1/2]:
    #   KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.75 * 0.405465 - 0.25 * 0.693147 = 0.130812
    # row 2: identical distributions: 0
    student = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    assert float(kl_sum(student, teacher)) == pytest.approx(0.130812, abs=1e-6)


def test_kl_with_temperature():
    # T = 2: teacher softmax([ln 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1) = [0.633975, 0.366025]; uniform student;
    # KL = 0.633975 ln(1.267949) + 0.366025 ln(0.732051) = 0.150506 - 0.114165 = 0.036341, times T^2 = 4
    student = torch.tensor([[5.0, 5.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    by_hand = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert by_hand == pytest.approx(4 * 0.036341, abs=1e-5)
    assert float(kl_sum(student, teacher, temperature=2.0)) == pytest.approx(by_hand, abs=1e-6)


def test_kl_is_from_the_teacher():
    # KL(teacher || student) with teacher [1, 0] (as logits [0, -inf]-like: large gap) is -ln(student's p of 0)
    student = torch.tensor([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    teacher = torch.tensor([[50.0, 0.0]])  # softmax ~ [1, 0]
    assert float(kl_sum(student, teacher)) == pytest.approx(math.log(4.0), abs=1e-5)


def test_normalised_feature_mse():
    # layer 1: MSE([1, 2, 3, 4], [1, 1, 1, 1]) = (0 + 1 + 4 + 9) / 4 = 3.5, MSE(teacher, 0) = 1 -> 3.5
    # layer 2: MSE([0, 0], [2, -2]) = 4, MSE(teacher, 0) = 4 -> 1
    s1, t1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 2)
    s2, t2 = torch.zeros(1, 2), torch.tensor([[2.0, -2.0]])
    assert float(normalised_mse(s1, t1, eps=0.0)) == 3.5
    assert float(normalised_mse(s2, t2, eps=0.0)) == 1.0
    assert float(squarehead_feature_loss([s1, s2], [t1, t2], eps=0.0)) == 4.5
    assert float(normalised_mse(s1, t1)) == pytest.approx(3.5 / (1 + 1e-6))


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :5] = -100  # a prompt: no loss there
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("chunk", [0, 7])
def test_a_teacher_identical_to_the_student_adds_nothing(chunk):
    model = make_tiny_model("llama").float()
    teacher = Teacher(make_tiny_model("llama").float(), "same", "fp32", capture_layers=True)
    distiller = Distiller(teacher, "squarehead", weight=1.0, temperature=2.0)
    nll, objective = distiller.objective(model, batch(), chunk)
    expected = token_nll_sum(model, batch(), chunk)
    assert float(nll.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # KL and features ~ 0
    assert float(objective.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-4)


def test_the_objective_adds_the_weighted_kl_of_the_label_positions():
    model, other = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    b = batch()
    teacher = Teacher(other, "other", "fp32", capture_layers=False)
    nll, objective = Distiller(teacher, "kl", weight=0.5, temperature=1.0).objective(model, b, 0)
    with torch.no_grad():
        logits_s = model(input_ids=b["input_ids"]).logits[:, :-1].reshape(-1, 256)
        logits_t = other(input_ids=b["input_ids"]).logits[:, :-1].reshape(-1, 256)
    keep = b["labels"][:, 1:].reshape(-1) != -100
    p_t = torch.softmax(logits_t[keep].double(), -1)
    by_formula = (p_t * (p_t.log() - torch.log_softmax(logits_s[keep].double(), -1))).sum()
    assert float((objective - nll).detach()) == pytest.approx(0.5 * float(by_formula), rel=1e-4)


def test_a_different_vocabulary_or_tokenizer_is_refused():
    check_same_vocabulary(256, 256, {"a": 0, "b": 1}, {"a": 0, "b": 1})
    with pytest.raises(SparsetuneError, match="vocabulary holds 300 tokens and the student's 256"):
        check_same_vocabulary(256, 300, None, None)
    with pytest.raises(SparsetuneError, match=r"tokenizer differs from the student's \(2 token ids differ\)"):
        check_same_vocabulary(256, 256, {"a": 0, "b": 1}, {"a": 0, "c": 1})


def test_load_teacher_refuses_before_reading_weights(tmp_path):
    teacher_dir = tmp_path / "teacher"
    make_tiny_model("llama", vocab_size=300).save_pretrained(teacher_dir)
    (teacher_dir / "model.safetensors").write_bytes(b"not weights")  # never read: the config refuses first
    student = make_tiny_model("llama")
    with pytest.raises(SparsetuneError, match="300 tokens"):
        load_teacher(str(teacher_dir), "bf16", torch.device("cpu"), student, make_tokenizer(), False)


def test_the_teacher_defaults_to_the_recorded_source():
    assert source_model(None) is None
    assert source_model({"settings": {"model": "dense"}}) == "dense"
    assert source_model({"source_model": "orig", "settings": {"model": "dense"}}) == "orig"


def test_squarehead_needs_the_same_layers(tmp_path):
    teacher_dir = tmp_path / "deeper"
    make_tiny_model("llama", num_hidden_layers=3).save_pretrained(teacher_dir)
    make_tokenizer().save_pretrained(teacher_dir)
    student = make_tiny_model("llama")
    with pytest.raises(SparsetuneError, match="teacher has 3 layers of width 64 where the student has 2"):
        load_teacher(str(teacher_dir), "bf16", torch.device("cpu"), student, make_tokenizer(), True)
    teacher = load_teacher(str(teacher_dir), "bf16", torch.device("cpu"), student, make_tokenizer(), False)
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in teacher.model.parameters())


@pytest.mark.parametrize(
    ("method", "loss"), [("seft", "squarehead"), ("lora-reprune", "kl"), ("masked-ft", "squarehead")]
)
def test_every_method_distils(tmp_path, method, loss):
    from helpers import make_pruned, write_text

    from sparsetune.train.seft import run_seft
    from sparsetune.train.seft_config import SeftConfig

    pruned = make_pruned(tmp_path, sparsity=0.5)  # the teacher is the recorded source, dense-0
    settings = {"model": str(pruned), "output": str(tmp_path / "out"), "data": str(write_text(tmp_path / "t.txt"))}
    settings.update(seqlen=32, batch_size=4, grad_accum=2, steps=3, lr=1e-3, method=method, distill_loss=loss)
    report = run_seft(SeftConfig(**settings), show_progress=False)
    distill = report["summary"]["distillation"]
    assert distill["teacher"] == str(tmp_path / "dense-0") and distill["loss"] == loss
    assert distill["mean_kl_per_token"] > 0 and 0 < distill["teacher_step_share"] < 1
    assert (distill["mean_feature_loss"] is not None) == (loss == "squarehead")
    entry = report["finetune_history"][-1]
    assert entry["distillation"]["teacher_weight_bytes"] == distill["teacher_weight_bytes"]


def test_an_nf4_teacher_holds_less_and_distils(tmp_path):
    dense = tmp_path / "dense"
    make_tiny_model("llama").save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    student = make_tiny_model("llama")
    bf16 = load_teacher(str(dense), "bf16", torch.device("cpu"), student, make_tokenizer(), True)
    nf4 = load_teacher(str(dense), "nf4", torch.device("cpu"), student, make_tokenizer(), True)
    assert type(nf4.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert nf4.weight_bytes < 0.6 * bf16.weight_bytes  # 4-bit decoder Linears; embeddings and head stay bf16
    nll, objective = Distiller(nf4, "squarehead", weight=1.0, temperature=1.0).objective(student, batch(), 0)
    # the student is the teacher's dense original: only the 4-bit rounding separates them
    assert 0 < float((objective - nll).detach()) < 0.1 * float(nll.detach())
