"""The shipped offline lm-eval tasks: same documents, prompts, targets and accuracy as lm-eval's own tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import SHARED_DATA, TEST_DATA, make_tiny_model, write_choice_task

from sparsetune.errors import SparsetuneError
from sparsetune.evaluate import harness

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"


def byte_tokenizer():
    """A byte-level tokenizer (256 tokens, no merges): every text maps to distinct ids, no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="!", pad_token="!")


def hf_arc_row(row: dict) -> dict:
    """An AI2 jsonl row in the layout of the HF `allenai/ai2_arc` dataset (what lm-eval's arc_easy reads)."""
    choices = row["question"]["choices"]
    return {
        "id": row["id"],
        "question": row["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": row["answerKey"],
    }


def builtin_config(task_dir: str, name: str, data_files: dict[str, str]) -> dict:
    """lm-eval's own task config with its hub dataset replaced by local json files (same documents)."""
    cfg = yaml.safe_load((LM_EVAL_TASKS / task_dir / f"{name}.yaml").read_text())
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": data_files})
    cfg.update(task=f"{name}_builtin", training_split=None)
    cfg.pop("tag", None)
    for split in ("validation_split", "test_split"):
        if cfg.get(split) is not None and cfg[split] not in data_files:
            cfg[split] = None
    return cfg


@pytest.fixture
def mini_mirror():
    """A mirror holding the first documents of the real ARC-Easy and PIQA files, in their original formats."""
    return TEST_DATA


def test_mini_mirror_holds_the_first_lines_of_the_real_files():
    counts = {"arc/ARC-Easy-Test.jsonl": 16, "arc/ARC-Easy-Dev.jsonl": 4, "piqa/valid.jsonl": 10}
    for rel, n in counts.items():
        lines = (TEST_DATA / rel).read_text().splitlines()
        assert len(lines) == n and all(json.loads(line) for line in lines)
        if SHARED_DATA.is_dir():
            assert lines == (SHARED_DATA / rel).read_text().splitlines()[:n]
    labels = (TEST_DATA / "piqa" / "valid-labels.lst").read_text().split()
    assert labels == ["0", "1", "1", "1", "0", "1", "1", "0", "0", "0"]


def test_offline_arc_easy_matches_builtin_accuracy(mini_mirror, tmp_path):
    """Run both tasks through lm-eval on the same 16 documents: identical per-choice loglikelihoods and accuracy.

    lm-eval's arc_easy runs offline here because its hub dataset is swapped for a local json file holding the
    same documents in the HF layout; everything else (prompt, choices, target, metrics) is lm-eval's own YAML.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    rows = [json.loads(x) for x in (mini_mirror / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()]
    hf_file = tmp_path / "arc_hf_test.jsonl"
    hf_file.write_text("".join(json.dumps(hf_arc_row(r)) + "\n" for r in rows))
    builtin = builtin_config("arc", "arc_easy", {"test": str(hf_file)})

    lm = HFLM(pretrained=make_tiny_model(seed=3), tokenizer=byte_tokenizer(), batch_size=8)
    with harness.prepared_tasks(["arc_easy"], data_dir=mini_mirror) as setup:
        assert setup.offline["arc_easy"][1].endswith("arc/ARC-Easy-Test.jsonl")
        out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy", builtin], task_manager=setup.manager)
    ours, theirs = out["results"]["arc_easy"], out["results"]["arc_easy_builtin"]
    assert out["n-samples"]["arc_easy"]["effective"] == len(rows) == 16
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == theirs[metric]
    by_doc = {
        task: [s["filtered_resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
        for task in ("arc_easy", "arc_easy_builtin")
    }
    assert by_doc["arc_easy"] == by_doc["arc_easy_builtin"]
    # The random model's choices differ in loglikelihood, so the accuracy above is a real comparison.
    assert len({round(r[0], 3) for r in by_doc["arc_easy"][0]}) > 1
    assert 0 < ours["acc,none"] < 1


def test_offline_piqa_docs_match_builtin(mini_mirror, tmp_path):
    """PIQA labels come from valid-labels.lst; prompts, choices and targets equal lm-eval's piqa on the same rows."""
    from lm_eval.tasks import get_task_dict

    goals = [json.loads(x) for x in (mini_mirror / "piqa" / "valid.jsonl").read_text().splitlines()]
    labels = [int(x) for x in (mini_mirror / "piqa" / "valid-labels.lst").read_text().split()]
    hf_file = tmp_path / "piqa_hf_validation.jsonl"
    hf_file.write_text("".join(json.dumps({**g, "label": y}) + "\n" for g, y in zip(goals, labels, strict=True)))
    builtin = builtin_config("piqa", "piqa", {"validation": str(hf_file)})
    with harness.prepared_tasks(["piqa"], data_dir=mini_mirror) as setup:
        tasks = get_task_dict(["piqa", builtin], setup.manager)
    ours, theirs = tasks["piqa"], tasks["piqa_builtin"]
    ours_docs, their_docs = list(ours.validation_docs()), list(theirs.validation_docs())
    assert [d["label"] for d in ours_docs] == labels
    assert len(set(labels)) == 2
    for a, b in zip(ours_docs, their_docs, strict=True):
        assert ours.doc_to_text(a) == theirs.doc_to_text(b)
        assert ours.doc_to_choice(a) == theirs.doc_to_choice(b)
        assert ours.doc_to_target(a) == theirs.doc_to_target(b)


def test_missing_mirror_file_names_expected_path(tmp_path):
    (tmp_path / "arc").mkdir()
    expected = r"mirror file .*arc/ARC-Easy-Dev.jsonl for task arc_easy is missing"
    with pytest.raises(SparsetuneError, match=expected), harness.prepared_tasks(["arc_easy"], data_dir=tmp_path):
        pass


def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Brute force: log p(" " + choice | context) summed over the choice's tokens, one full forward per choice."""
    import torch

    n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    scores = []
    for choice in choices:
        ids = tokenizer(f"{context} {choice}", add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(n_context, len(ids))))
    return scores


def test_include_path_adds_user_tasks(tmp_path, tiny_tokenizer):
    """A user's task dir works exactly as lm-eval's --include_path (and needs no built-in index), and its accuracy
    equals the one computed by scoring each choice with the model directly."""
    words, gold = ["man", "it", "on", "world", "time"], [0, 1, 1, 0, 1]
    choices = ["is good", "was long"]
    questions = [(f"the {w}", a) for w, a in zip(words, gold, strict=True)]
    task_dir = write_choice_task(tmp_path / "mytasks", "my_task", questions, choices)
    model = make_tiny_model()
    scores = [choice_loglikelihoods(model, tiny_tokenizer, f"the {w}", choices) for w in words]
    picked = [max(range(len(choices)), key=s.__getitem__) for s in scores]
    # The documents are chosen so the model picks both choices and no pick is a near tie; with these labels,
    # always-first, always-second and reversed picks would give 2/5, 3/5 and 1/5.
    assert set(picked) == {0, 1} and min(abs(a - b) for a, b in scores) > 0.03
    expected = sum(p == g for p, g in zip(picked, gold, strict=True)) / len(words)
    assert expected == 4 / 5
    with harness.prepared_tasks(["my_task"], include_path=[str(task_dir)]) as setup:
        result = harness.run_tasks(model, tiny_tokenizer, setup, batch_size=4)
    assert result["my_task"]["n_samples"] == len(words)
    assert result["my_task"]["acc"] == pytest.approx(expected)
    assert result["my_task"]["source"] == "lm-eval"
