"""Plain helpers shared by the test modules: tiny random models and tokenizer, text, pruned model dirs and the
argument lists the CLI tests use. Fixtures live in conftest.py; test modules import helpers from here only."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch
from architectures import COMMON, model_from_config
from torch import nn

# The full offline data (../shared/data beside the checkout on dev and CI machines). A fresh clone has none; the
# tests that read real data then use the embedded samples (SPARSETUNE_TEST_SHARED_DATA=/nonexistent simulates it).
SHARED_DATA = Path(
    os.environ.get("SPARSETUNE_TEST_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
EMBEDDED_SAMPLES = Path(__file__).resolve().parents[1] / "sparsetune" / "samples"
TEST_DATA = Path(__file__).resolve().parent / "data"

_WORDS = (
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but have an "
    "they you were her she there one all we their been has would when who will more if no out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work long"
).split()


def make_tokenizer():
    """A small word-level tokenizer (about 200 tokens) built with `tokenizers`, no download needed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(_WORDS)) + list(".,;:!?\n"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = 256, tie: bool = False, **overrides):
    """A 2-layer, hidden-64 random model of a supported decoder family (the architecture matrix's common config)."""
    config = {**COMMON, "vocab_size": vocab_size, "tie_word_embeddings": tie, **overrides}
    return model_from_config(family, seed, config)


def load_weights(model_dir: Path | str, files: str = "model*.safetensors") -> dict[str, torch.Tensor]:
    """Every tensor of a model dir's safetensors files (one model.safetensors, or the shards a streamed run
    writes; not seft_adapter.safetensors unless `files` says so), read with safetensors itself."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob(files)):
        out.update(load_file(str(path)))
    return out


def save_weights(model_dir: Path | str, weights: dict[str, torch.Tensor]) -> None:
    """Replace a model dir's weights by one model.safetensors holding `weights`."""
    from safetensors.torch import save_file

    for path in Path(model_dir).glob("model*.safetensors"):
        path.unlink()
    Path(model_dir, "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(weights, str(Path(model_dir) / "model.safetensors"), metadata={"format": "pt"})


def random_text(n_words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return " ".join(words[i] + ("." if i % 13 == 12 else "") for i in range(n_words))


@contextlib.contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's -o size=, e.g. "200k") mounted at `mount` for the block, to test a full disk;
    skips the test where mounting is not possible (it needs root, as the project's machines and CI run)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads slow steps by 30x.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args):
    """`sparsetune <args>` through typer's test runner (arguments str()-ed, exceptions raised, not caught)."""
    from typer.testing import CliRunner

    from sparsetune.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# ---- calibration and block Linears (prune tests) -----------------------------------------------------------------


def random_calibration(n: int = 8, t: int = 32, seed: int = 0):
    """n random token windows of length t (ids 4..255), as a CalibrationSet."""
    from sparsetune.data import CalibrationSet

    ids = torch.randint(4, 256, (n, t), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, "random-ids", "random", seed, "test")


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


# ---- pruned model dirs and training inputs (seft / smet tests) ---------------------------------------------------


def make_pruned(root: Path, pattern: str | None = None, sparsity: float = 0.5, seed: int = 0) -> Path:
    """A tiny Llama pruned by magnitude (no calibration needed), written by the prune library."""
    from sparsetune.prune.api import run_prune
    from sparsetune.prune.config import PruneConfig

    dense = root / f"dense-{seed}"
    if not dense.exists():
        make_tiny_model("llama", seed=seed).save_pretrained(dense)
        make_tokenizer().save_pretrained(dense)
    out = root / f"pruned-{pattern or sparsity}-{seed}".replace(":", "of")
    target = {"pattern": pattern} if pattern else {"sparsity": sparsity}
    run_prune(PruneConfig(model=str(dense), output=str(out), method="magnitude", **target), show_progress=False)
    return out


def write_text(path: Path, n_docs: int = 8) -> Path:
    path.write_text("\n\n".join(random_text(300, seed=i) for i in range(n_docs)))
    return path


def write_alpaca(path: Path, n: int = 24) -> Path:
    records = [
        {
            "instruction": random_text(8, seed=i),
            "input": random_text(5, seed=100 + i) if i % 2 else "",
            "output": random_text(12, seed=200 + i),
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return path


def tiny_args(pruned: Path, out: Path, data: Path, *extra: str) -> list[str]:
    """`sparsetune seft` arguments for a tiny run."""
    return ["seft", str(pruned), "-o", str(out), "--data", str(data), "--seqlen", "32", "--batch-size", "4", *extra]


def seft_settings(pruned: Path, data: Path, out: Path, **extra) -> dict:
    """SeftConfig fields for a tiny run: 8 steps of 4 sequences of 32 tokens (the method's settings in `extra`)."""
    base = {"model": str(pruned), "output": str(out), "data": str(data), "seqlen": 32, "batch_size": 4, "steps": 8}
    return {**base, "lr": 5e-3, **extra}


def smet_settings(tok_dir: Path, text: Path, out: Path, **extra) -> dict:
    """SmetConfig fields for a 12-step run of the tiny preset."""
    base = {
        "model_config": "tiny",
        "tokenizer": str(tok_dir),
        "data": str(text),
        "output": str(out),
        "seqlen": 32,
        "batch_size": 4,
        "steps": 12,
        "lr": 3e-3,
        "update_interval": 3,
        "regrow_warmup": 2,
        "drop_fraction": 0.3,
    }
    return {**base, **extra}


# ---- evaluation tests --------------------------------------------------------------------------------------------


def write_choice_task(folder: Path, name: str, questions: list[tuple[str, int]], choices: list[str]) -> Path:
    """A user task dir for lm-eval's --include_path: `folder`/`name`.yaml, a multiple-choice task (metric acc)
    over `questions` ((text, index of the right choice) pairs, written beside the dir as `name`.jsonl)."""
    import yaml

    docs = folder.parent / f"{name}.jsonl"
    docs.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in questions))
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(
        yaml.safe_dump(
            {
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(docs)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{q}}",
                "doc_to_target": "{{a}}",
                "doc_to_choice": "{{" + repr(choices) + "}}",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    return folder


# ---- export tests ------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_pruned_dir(
    path, tokenizer, pattern="unstructured", dtype="float32", tie=False, skip=(), multiply=False, **overrides
):
    """A tiny Llama whose decoder Linears are zeroed with random masks (no prune engine involved).

    multiply=True zeroes as sparsetune's pruners do (`w * mask`), so pruned negative weights become -0.0.
    """
    from sparsetune.masks import NMPattern, nm_mask, row_mask

    model = make_tiny_model("llama", seed=3, tie=tie, **overrides)
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and not any(s in name for s in skip):
            w = module.weight.data
            scores = torch.rand(w.shape, generator=gen)
            keep = nm_mask(scores, NMPattern(2, 4)) if pattern == "2:4" else row_mask(scores, 0.5)
            w.mul_(keep) if multiply else w.masked_fill_(~keep, 0)
    model.to(DTYPES[dtype])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: compares -0.0 and NaN payloads exactly."""
    return t.contiguous().view(torch.uint8)


def pruned_tiny(target, seed: int = 0) -> nn.Module:
    """The tiny Llama with its decoder Linears magnitude-pruned to `target` (a sparsity or an NMPattern)."""
    from sparsetune import masks
    from sparsetune.patterns import NMPattern

    model = make_tiny_model("llama", seed=seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                score = mod.weight.abs()
                keep = (
                    masks.nm_mask(score, target) if isinstance(target, NMPattern) else masks.matrix_mask(score, target)
                )
                mod.weight.mul_(keep)
    return model


def token_batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 256, (n, 4, 32), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def in_memory_seft(model: nn.Module, settings, steps: int, out: Path, lr: float = 1e-2, on_topology=None, **cfg):
    """A `seft` run (the real loop, `FinetuneRun`) over the in-memory pruned `model`, not yet set up: `steps` optimizer
    steps at a constant `lr` on the sequences of `token_batches()`, with the method settings `settings` (a
    DeltaSettings; `method`, `optim`, `seed`, checkpointing ... as `cfg`). `on_topology(method, stats)` sees every
    topology update. Only `finish` writes `out`."""
    from sparsetune.train.examples import Examples
    from sparsetune.train.loop import Trainer
    from sparsetune.train.seft import FinetuneRun
    from sparsetune.train.seft_config import SeftConfig
    from sparsetune.train.sparse_start import find_sparse_start

    class InMemoryRun(FinetuneRun):
        def setup(self, inputs: tuple[str, ...] = ()) -> None:
            Trainer.setup(self)  # no input dir to keep apart from the output

        def load(self) -> None:
            torch.manual_seed(self.cfg.seed)
            self.model, self.tokenizer, self.pad_id = model, None, 0
            self.start = find_sparse_start(model, None)
            self.train_data = Examples("text", [row for b in token_batches() for row in b["input_ids"]], None)
            self.val_data = None
            for p in model.parameters():
                p.requires_grad_(False)
            model.train()

        def topology_update(self, step: int):
            stats = super().topology_update(step)
            if stats is not None and on_topology is not None:
                on_topology(self.method, stats)
            return stats

    base = {"seqlen": 32, "batch_size": 4, "warmup_steps": 0, "min_lr_ratio": 1.0}
    values = {**base, **settings.model_dump(exclude_unset=True), **cfg}
    seft_cfg = SeftConfig(model="(in memory)", data="(in memory)", output=str(out), steps=steps, lr=lr, **values)
    return InMemoryRun(seft_cfg, show_progress=False)


def delta_run(model: nn.Module, settings, steps: int, out: Path, lr: float = 1e-2, on_topology=None, **cfg):
    """`in_memory_seft`, set up and trained (the model is trained in place; nothing is written)."""
    run = in_memory_seft(model, settings, steps, out, lr, on_topology, **cfg)
    run.setup()
    run.train()
    return run


def cli_flags(settings: dict) -> list[str]:
    """Command-line flags for config `settings` (booleans as --x / --no-x)."""
    flags: list[str] = []
    for key, value in settings.items():
        if isinstance(value, bool):
            flags += [f"--{'' if value else 'no-'}{key.replace('_', '-')}"]
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def torchrun_or_skip() -> str:
    """The torchrun next to this python (the multi-process tests skip without one)."""
    import shutil
    import sys

    import pytest

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this python")
    return torchrun


def run_sparsetune(args: list[str], processes: int = 1):
    """`python -m sparsetune ARGS` in a subprocess (under torchrun with 2+ `processes`, gloo on the CPU), one thread
    per process; returns the CompletedProcess (output captured as text)."""
    import subprocess
    import sys

    env = {**os.environ, **ONE_THREAD_ENV, "ACCELERATE_USE_CPU": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher = [torchrun_or_skip(), "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*launcher, "-m", "sparsetune", *args], capture_output=True, text=True, env=env)


def run_one_and_two_processes(args: list[str], root: Path) -> tuple[Path, Path]:
    """`sparsetune ARGS` once in one process (-o ROOT/one) and once under torchrun with two (-o ROOT/two), both
    asserted to succeed; returns the two output dirs."""
    torchrun_or_skip()  # skip before the single-process run, not after it
    outputs = (root / "one", root / "two")
    for processes, out in zip((1, 2), outputs, strict=True):
        done = run_sparsetune([*args, "-o", str(out)], processes=processes)
        assert done.returncode == 0, f"{processes} process(es): {done.stderr[-3000:]}"
    return outputs


def kill_after_logged_step(proc, live_log: Path, step: int, timeout_s: float = 300.0) -> None:
    """SIGKILL a training subprocess once its live train_log.jsonl (in the checkpoint dir) holds the row of `step`
    or a later one: the kill lands after a known point of the run, decided by the run's own output, not a timer."""
    import json
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        text = live_log.read_text() if live_log.exists() else ""
        complete = text[: text.rfind("\n") + 1].splitlines()  # a row being written is not read yet
        if any(json.loads(line)["step"] >= step for line in complete):
            break
        time.sleep(0.01)  # polling interval of the file, not the moment of the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
