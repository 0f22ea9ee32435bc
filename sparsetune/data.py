"""Text sources -> records -> token batches.

A source is a dataset name (`c4`, `wikitext2`, `alpaca`, `tinyshakespeare`), or a local `.txt`, `.jsonl`,
`.json` or `.parquet` file. Names load from the HF hub with `datasets.load_dataset`; when a mirror dir is
given (`--data-dir` or `SPARSETUNE_DATA_DIR`) they resolve to files laid out like `shared/data` instead.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsetune import hub
from sparsetune.errors import SparsetuneError

if TYPE_CHECKING:  # torch is imported where tensors are made, so the CLI checks data files before importing it
    import torch

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SPARSETUNE_DATA_DIR"


@dataclass(frozen=True)
class NamedSplit:
    """Where one split of a named dataset lives: on the hub, and inside a mirror dir."""

    hub_path: str
    hub_name: str | None
    hub_split: str
    mirror_file: str
    hub_kwargs: dict[str, Any] = field(default_factory=dict)


# name -> split -> location. `train` feeds calibration and training, `test`/`validation` feed evaluation.
NAMED_DATASETS: dict[str, dict[str, NamedSplit]] = {
    "c4": {
        "train": NamedSplit(
            "allenai/c4",
            None,
            "train",
            "c4/c4_sample.jsonl",
            {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
        ),
        "validation": NamedSplit(
            "allenai/c4",
            None,
            "validation",
            "c4/c4_validation.jsonl",
            {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
        ),
    },
    "wikitext2": {
        "train": NamedSplit("wikitext", "wikitext-2-raw-v1", "train", "wikitext-2-raw/wiki.train.raw"),
        "test": NamedSplit("wikitext", "wikitext-2-raw-v1", "test", "wikitext-2-raw/wiki.test.raw"),
    },
    "alpaca": {
        "train": NamedSplit("tatsu-lab/alpaca", None, "train", "alpaca/alpaca_small.json"),
    },
    "tinyshakespeare": {
        "train": NamedSplit("karpathy/tiny_shakespeare", None, "train", "tinyshakespeare/input.txt"),
    },
}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def mirror_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def is_instruction_record(record: dict[str, Any]) -> bool:
    return "instruction" in record and "output" in record


def alpaca_prompt(record: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response) in the Stanford Alpaca template."""
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", "")), str(record["output"])


def record_text(record: dict[str, Any]) -> str:
    """The plain text of a record: its `text`, or the Alpaca prompt followed by the response."""
    if "text" in record:
        return str(record["text"])
    prompt, response = alpaca_prompt(record)
    return prompt + response


def load_records(
    source: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Load a source as a list of dict records, each with `text` or Alpaca `instruction/input/output`."""
    if source in NAMED_DATASETS:
        return _load_named(source, split, mirror_dir(data_dir))
    records = read_records_file(existing_source(source))
    if not records:
        raise SparsetuneError(f"data source {source} is empty; pass a file with text in it")
    return records


def _load_named(name: str, split: str, mirror: Path | None) -> list[dict[str, Any]]:
    splits = NAMED_DATASETS[name]
    if split not in splits:
        raise SparsetuneError(f"dataset {name} has no {split!r} split here; available: {', '.join(splits)}")
    where = splits[split]
    if mirror is not None:
        path = mirror / where.mirror_file
        if not path.exists():
            raise SparsetuneError(
                f"mirror file {path} for {name} ({split}) is missing; add it or point --data-dir/"
                f"{DATA_DIR_ENV} at a mirror laid out like shared/data"
            )
        return read_records_file(path)
    return load_hub_or_sample(name, split, where)


def _load_from_hub(name: str, where: NamedSplit) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(where.hub_path, where.hub_name, split=where.hub_split, **where.hub_kwargs)
    except Exception as err:  # noqa: BLE001 - offline, missing, auth: all mean "use a mirror"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SparsetuneError(
            f"could not load {name} from the hub ({first}); set --data-dir or {DATA_DIR_ENV} to a local mirror"
        ) from err
    if name == "wikitext2":
        return [{"text": t} for t in ds["text"]]
    return [dict(r) for r in ds]


def existing_source(source: str) -> Path:
    """A local data source's path; a missing one is one error naming the choices."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SparsetuneError(
            f"data source {source!r} not found; pass an existing file or one of {', '.join(NAMED_DATASETS)}"
        )
    return path


TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".json")


def check_suffix(path: Path) -> None:
    if path.suffix.lower() not in (*TEXT_SUFFIXES, ".parquet"):
        raise SparsetuneError(f"unsupported data file {path}; use .txt, .jsonl, .json or .parquet")


def check_source(source: str) -> None:
    """Refuse a local data file that `load_records` would refuse for its name or its encoding (missing, an
    unsupported suffix, binary, UTF-16, not UTF-8 at the start) with the same error, reading only its head. Named
    datasets pass: they are looked up when they load. A file that passes may still fail to parse then."""
    if source in NAMED_DATASETS:
        return
    path = existing_source(source)
    check_suffix(path)
    if path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
        head = _head(path)
        _check_text_head(path, head)
        try:  # an incomplete character at the end of the head is not an error: the decoder waits for more
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as err:
            raise _not_utf8(path, err) from err


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8192)


def _check_text_head(path: Path, head: bytes) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SparsetuneError(f"{path} is UTF-16 text; convert it, e.g. iconv -f utf-16 -t utf-8 {path.name}")
    if b"\0" in head:  # text never holds NUL bytes; looked for before a large binary file is read whole
        raise SparsetuneError(f"{path} is a binary file, not text; pass a UTF-8 .txt/.jsonl/.json or a .parquet")


def _not_utf8(path: Path, err: UnicodeDecodeError) -> SparsetuneError:
    return SparsetuneError(
        f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
        f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}"
    )


def read_text_file(path: Path) -> str:
    """A data file's text as UTF-8; a binary or otherwise encoded file is one error naming the fix."""
    _check_text_head(path, _head(path))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _jsonl_rows(path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise SparsetuneError(
                f"{path} line {number} is not valid JSON ({err.msg}, column {err.colno}); fix that line: "
                "each line of a .jsonl file holds one JSON object"
            ) from err
    return rows


def read_records_file(path: Path) -> list[dict[str, Any]]:
    # Hand-written rather than `datasets.load_dataset("json"/"text"/"parquet", data_files=...)`, which measured
    # slower on every file type tried, plus an import this path otherwise avoids (no bench suite covers it; the
    # figures are in the comment commit ae53ba8 added), and changes records: it fills fields missing from a row
    # with None (a text row mixed with Alpaca rows gets instruction=None, an Alpaca row text=None), parses
    # timestamp strings to datetimes, and reports a bad .jsonl line as "row N" of a pyarrow error instead of the
    # line and column, with no UTF-16 / binary / non-UTF-8 diagnosis.
    suffix = path.suffix.lower()
    check_suffix(path)
    if suffix in (".txt", ".raw"):
        if path.name.startswith("wiki.") and suffix == ".raw":
            return wikitext_rows(read_text_file(path))
        return [{"text": read_text_file(path)}]
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".json":
        try:
            loaded = json.loads(read_text_file(path))
        except json.JSONDecodeError as err:
            raise SparsetuneError(
                f"{path} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno}); fix it, or write "
                "one record per line as .jsonl"
            ) from err
        rows = loaded if isinstance(loaded, list) else loaded.get("data", []) if isinstance(loaded, dict) else []
    else:  # .parquet
        import pyarrow
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as err:
            raise SparsetuneError(
                f"{path} is not a readable parquet file ({_first_line(err)}); re-write it, or pass .txt/.jsonl/.json"
            ) from err
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not ("text" in row or is_instruction_record(row)):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise SparsetuneError(
                f"{path} record {i} has no `text` field nor Alpaca `instruction/output` fields (found {keys}); "
                "rename the text field to `text`"
            )
    return rows


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def wikitext_rows(raw: str) -> list[dict[str, Any]]:
    """Rows as the HF `wikitext` loader yields them: every line keeps its newline, blank lines become ''."""
    return [{"text": line if line.strip() else ""} for line in raw.splitlines(keepends=True)]


def token_hash(ids: torch.Tensor) -> str:
    import torch

    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # (N, T) int64
    source: str
    sampling: str
    seed: int
    token_hash: str

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": self.n_samples,
            "seqlen": self.seqlen,
            "sampling": self.sampling,
            "seed": self.seed,
            "token_hash": self.token_hash,
        }


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, verbose=False)["input_ids"])


def calibration_set(
    tokenizer: Any,
    source: str,
    n_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    sampling: str = "random",
    data_dir: str | os.PathLike[str] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> CalibrationSet:
    """Draw `n_samples` windows of `seqlen` tokens from a source.

    `random` (the Wanda/SparseGPT reference): pick a random document longer than `seqlen`, then a random
    window inside it. `consecutive`: join all documents with "\\n\\n", tokenize once, take windows from the start.
    """
    import torch

    if n_samples < 1 or seqlen < 1:
        raise SparsetuneError("--calib-samples and --seqlen must be at least 1")
    if records is None:
        records = load_records(source, "train", data_dir)
    texts = [record_text(r) for r in records]
    if sampling == "consecutive":
        ids = _encode(tokenizer, "\n\n".join(texts))
        needed = n_samples * seqlen
        if len(ids) < needed:
            raise SparsetuneError(
                f"calibration source {source} holds {len(ids)} tokens, {needed} are needed "
                f"({n_samples} x {seqlen}); lower --calib-samples or --seqlen, or use more data"
            )
        batch = torch.tensor(ids[:needed], dtype=torch.int64).view(n_samples, seqlen)
    elif sampling == "random":
        batch = _random_windows(tokenizer, texts, source, n_samples, seqlen, seed)
    else:
        raise SparsetuneError(f"unknown --calib-sampling {sampling!r}; use random or consecutive")
    return CalibrationSet(batch, source_label(records, source), sampling, seed, token_hash(batch))


def _random_windows(
    tokenizer: Any, texts: list[str], source: str, n_samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    import torch

    rng = random.Random(seed)
    lengths: dict[int, list[int]] = {}
    too_short: set[int] = set()
    longest = 0
    windows = []
    while len(windows) < n_samples:
        i = rng.randint(0, len(texts) - 1)
        if i not in lengths:
            lengths[i] = _encode(tokenizer, texts[i])
        ids = lengths[i]
        if len(ids) <= seqlen:
            too_short.add(i)
            longest = max(longest, len(ids))
            if len(too_short) == len(texts):
                raise SparsetuneError(
                    f"calibration source {source} has no document longer than {seqlen} tokens (longest: "
                    f"{longest}); use --calib-sampling consecutive or a shorter --seqlen"
                )
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.int64)


# ---- the embedded samples: named sets that work with no hub and no mirror -------------------------------------

SAMPLES_DIR = Path(__file__).parent / "samples"
# (name, split) -> file inside SAMPLES_DIR, which is laid out like a mirror (see samples/README.md).
EMBEDDED_SAMPLES: dict[tuple[str, str], str] = {
    ("c4", "train"): "c4/c4_sample.jsonl",
    ("wikitext2", "test"): "wikitext-2-raw/wiki.test.raw",
}
_announced: set[tuple[str, str]] = set()


class SampleRecords(list):  # type: ignore[type-arg]
    """Records read from an embedded sample; `label` is what figures computed from them are called."""

    label: str


def sample_label(name: str) -> str:
    return f"{name} (embedded sample)"


def source_label(records: list[dict[str, Any]], source: str) -> str:
    """The name results from `records` carry: `source`, or `NAME (embedded sample)` for an embedded sample."""
    return getattr(records, "label", source)


def load_hub_or_sample(name: str, split: str, where: NamedSplit) -> list[dict[str, Any]]:
    """No mirror: the hub (or, once the hub probe failed, only the HF datasets cache), else the embedded sample.

    The sample also stands in when a hub that answers cannot serve the set (a captive portal, a proxy that
    answers everything with 404): the line printed says why.
    """
    online = hub.hub_reachable()
    try:
        return _load_from_hub(name, where)
    except SparsetuneError as err:
        if (name, split) not in EMBEDDED_SAMPLES:
            raise
        reason = "the hub is unreachable" if not online else f"the hub load failed: {err.__cause__ or err}"
    return load_embedded_sample(name, split, reason)


def load_embedded_sample(name: str, split: str, reason: str = "the hub is unreachable") -> SampleRecords:
    """The embedded sample of a named split (one line says so, once per process)."""
    path = SAMPLES_DIR / EMBEDDED_SAMPLES[(name, split)]
    records = SampleRecords(read_records_file(path))
    records.label = sample_label(name)
    if (name, split) not in _announced:
        _announced.add((name, split))
        first = (reason.strip().splitlines() or [reason])[0][:160]
        log.warning(
            "%s (%s): no mirror (--data-dir / %s) and %s; using the embedded sample %s (%d records), "
            "results are labelled %r",
            name,
            split,
            DATA_DIR_ENV,
            first,
            path.relative_to(SAMPLES_DIR.parent.parent),
            len(records),
            records.label,
        )
    return records
