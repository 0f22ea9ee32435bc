"""Text sources -> records -> calibration windows."""

from __future__ import annotations

import json

import pytest
import torch

from sparsetune.data import calibration_set, check_source, load_records, record_text, wikitext_rows
from sparsetune.errors import SparsetuneError


def test_file_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("plain text")
    assert [r["text"] for r in load_records(str(tmp_path / "a.jsonl"))] == ["one", "two"]
    alpaca = load_records(str(tmp_path / "b.json"))
    assert "### Instruction:\nAdd" in record_text(alpaca[0]) and record_text(alpaca[0]).endswith("### Response:\n2")
    assert len(load_records(str(tmp_path / "c.parquet"))) == 3
    assert load_records(str(tmp_path / "d.txt")) == [{"text": "plain text"}]


def test_bad_records_name_the_field(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SparsetuneError, match="no `text` field"):
        load_records(str(tmp_path / "bad.jsonl"))


def _error(call, *args) -> str | None:
    try:
        call(*args)
    except SparsetuneError as err:
        return str(err)
    return None


BAD_SOURCES = {  # file name -> (bytes, what the error says)
    "ls": (b"\x7fELF\x02\x01\x01\x00" + bytes(256), "unsupported data file"),
    "bin.txt": (b"\x7fELF\x02\x01\x01\x00" + bytes(256), "is a binary file, not text"),
    "u16.jsonl": ('{"text": "hi"}\n'.encode("utf-16"), "is UTF-16 text"),
    "l1.json": ('[{"text": "caf\u00e9"}]'.encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 14)"),
}


@pytest.mark.parametrize("name", sorted(BAD_SOURCES))
def test_check_source_refuses_what_load_records_refuses_with_the_same_error(tmp_path, name):
    content, expected = BAD_SOURCES[name]
    path = tmp_path / name
    path.write_bytes(content)
    error = _error(check_source, str(path))
    assert error is not None and expected in error
    assert error == _error(load_records, str(path))


def test_check_source_reads_only_the_head(tmp_path):
    """Named sets and good files pass; a UTF-8 character cut at the end of the 8 KiB head is no error, and a bad
    byte after the head is left for load_records to find."""
    check_source("wikitext2")
    missing = str(tmp_path / "none.txt")
    assert _error(check_source, missing) == _error(load_records, missing) is not None
    cut = tmp_path / "cut.txt"
    cut.write_bytes(b"a" * 8191 + "\u00e9".encode() + b" tail")  # the 2-byte character spans bytes 8191-8192
    check_source(str(cut))
    assert load_records(str(cut)) == [{"text": "a" * 8191 + "\u00e9 tail"}]
    late = tmp_path / "late.txt"
    late.write_bytes(b"a" * 9000 + b"\xe9")
    check_source(str(late))
    assert "byte 0xe9 at offset 9000" in _error(load_records, str(late))


def test_named_dataset_missing_mirror_file_names_the_path(tmp_path):
    with pytest.raises(SparsetuneError, match=r"wikitext-2-raw/wiki.train.raw.*missing"):
        load_records("wikitext2", "train", data_dir=tmp_path)


def test_wikitext_rows_match_hf_loader_convention():
    rows = wikitext_rows(" \n = Title = \n \n Body text . \n")
    assert [r["text"] for r in rows] == ["", " = Title = \n", "", " Body text . \n"]


def test_random_windows_are_seeded_and_hashed(tiny_tokenizer, text_file):
    a = calibration_set(tiny_tokenizer, str(text_file), n_samples=4, seqlen=16, seed=0)
    b = calibration_set(tiny_tokenizer, str(text_file), n_samples=4, seqlen=16, seed=0)
    c = calibration_set(tiny_tokenizer, str(text_file), n_samples=4, seqlen=16, seed=1)
    assert a.input_ids.shape == (4, 16) and torch.equal(a.input_ids, b.input_ids) and a.token_hash == b.token_hash
    assert a.token_hash != c.token_hash


def test_consecutive_windows_take_the_joined_stream_from_the_start(tiny_tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["the man said", "good work"]))
    calib = calibration_set(tiny_tokenizer, str(path), n_samples=1, seqlen=5, sampling="consecutive")
    expected = tiny_tokenizer("the man said\n\ngood work")["input_ids"][:5]
    assert calib.input_ids[0].tolist() == expected


def test_too_few_tokens_says_how_many(tiny_tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("the man said")
    with pytest.raises(SparsetuneError, match=r"holds 3 tokens, 32 are needed"):
        calibration_set(tiny_tokenizer, str(path), n_samples=2, seqlen=16, sampling="consecutive")
    with pytest.raises(SparsetuneError, match="no document longer than 16 tokens"):
        calibration_set(tiny_tokenizer, str(path), n_samples=2, seqlen=16, sampling="random")


def test_mirror_c4_and_wikitext2(shared_data):
    """The real files through a mirror dir: ../shared/data, or the embedded samples (a partial mirror)."""
    c4_lines = (shared_data / "c4" / "c4_sample.jsonl").read_text(encoding="utf-8").splitlines()
    c4 = load_records("c4", "train", data_dir=shared_data)
    assert len(c4) == len(c4_lines) >= 200
    assert c4[0]["url"] == "https://klyq.com/beginners-bbq-class-taking-place-in-missoula/"
    assert c4[0]["text"].startswith("Beginners BBQ Class Taking Place in Missoula!\nDo you want")
    wiki = load_records("wikitext2", "test", data_dir=shared_data)
    assert len(wiki) == 4358
    assert wiki[:3] == [{"text": ""}, {"text": " = Robert Boulter = \n"}, {"text": ""}]


def test_mirror_alpaca(tmp_path):
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ]
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_small.json").write_text(json.dumps(records))
    assert load_records("alpaca", "train", data_dir=tmp_path) == records
