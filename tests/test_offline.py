"""No network: one short hub probe per process, offline mode after it, and the embedded samples in its place."""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA

from sparsetune import data, hub
from sparsetune.errors import SparsetuneError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sparsetune" / "samples"
# From the published files (shared/data/README.md lists the same prefixes).
WIKITEXT2_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def closed_port_url() -> str:
    """An http URL on this machine where nothing listens: connecting is refused at once, like a dead network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def online_env(monkeypatch):
    """The process as a user without HF_HUB_OFFLINE would start it (the suite's conftest sets it)."""
    import datasets.config
    import huggingface_hub.constants

    for name in OFFLINE_VARS:
        monkeypatch.setenv(name, "")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(hub, "_reachable", None)  # not asked yet in this process; the answer is restored after
    yield monkeypatch


def count_probes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = hub._head

    def counted(url: str, timeout: float) -> str | None:
        calls.append(url)
        return real(url, timeout)

    monkeypatch.setattr(hub, "_head", counted)
    return calls


def test_unreachable_hub_is_probed_once_and_switches_offline_mode_on(online_env):
    import datasets.config
    import huggingface_hub.constants

    url = closed_port_url()
    online_env.setenv("HF_ENDPOINT", url)
    calls = count_probes(online_env)
    assert [hub.hub_reachable() for _ in range(3)] == [False, False, False]
    assert calls == [url]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert huggingface_hub.constants.is_offline_mode() is True  # what transformers asks
    assert datasets.config.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_any_http_answer_counts_as_reachable(online_env):
    import huggingface_hub.constants

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the http.server hook name
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}/")
        calls = count_probes(online_env)
        assert hub.hub_reachable() is True
        assert hub.hub_reachable() is True
    finally:
        server.shutdown()
        server.server_close()
    assert calls == [f"http://127.0.0.1:{server.server_port}"]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_offline_mode_set_by_the_user_means_no_probe(online_env):
    online_env.setenv("HF_HUB_OFFLINE", "1")
    calls = count_probes(online_env)
    assert hub.hub_reachable() is False
    assert calls == []


def test_a_hub_that_answers_but_cannot_serve_falls_back_only_for_embedded_sets(online_env):
    """A captive portal or an intercepting proxy answers the probe; the embedded sets still work."""
    online_env.setattr(hub, "hub_reachable", lambda: True)

    def failing(name, where):
        raise SparsetuneError(f"could not load {name} from the hub (404)")

    online_env.setattr(data, "_load_from_hub", failing)
    c4 = data.load_records("c4", "train")
    assert data.source_label(c4, "c4") == "c4 (embedded sample)"
    assert len(c4) == 200
    wiki = data.load_records("wikitext2", "test")
    assert data.source_label(wiki, "wikitext2") == "wikitext2 (embedded sample)"
    with pytest.raises(SparsetuneError, match="could not load alpaca"):
        data.load_records("alpaca", "train")
    with pytest.raises(SparsetuneError, match="could not load wikitext2"):
        data.load_records("wikitext2", "train")  # only the test split is embedded


def test_embedded_samples_are_unmodified_slices_of_the_published_files():
    wiki = (SAMPLES / "wikitext-2-raw" / "wiki.test.raw").read_bytes()
    assert hashlib.sha256(wiki).hexdigest() == WIKITEXT2_TEST_SHA256
    assert len(wiki.splitlines()) == 4358
    c4_lines = (SAMPLES / "c4" / "c4_sample.jsonl").read_bytes().splitlines(keepends=True)
    assert len(c4_lines) == 200
    assert all(sorted(json.loads(line)) == ["text", "timestamp", "url"] for line in c4_lines)
    if (SHARED_DATA / "c4" / "c4_sample.jsonl").is_file():  # the published shard's first documents, byte for byte
        shared = (SHARED_DATA / "c4" / "c4_sample.jsonl").read_bytes().splitlines(keepends=True)
        assert c4_lines == shared[:200]
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 2_000_000
    readme = (SAMPLES / "README.md").read_text()
    for needle in ("ODC-BY", "CC BY-SA", WIKITEXT2_TEST_SHA256, "c4-train.00000-of-01024"):
        assert needle in readme


def test_cli_with_no_network_probes_once_never_retries_and_uses_the_samples(tiny_model_dir, tmp_path):
    """A fresh process, hub endpoint dead, no mirror, an empty HF cache: prune (calib c4) then eval (ppl wikitext2)
    in one `sparsetune run`. Without the probe, huggingface_hub would retry each load five times."""
    recipe = tmp_path / "offline.yaml"
    recipe.write_text(
        "stages:\n"
        f"  - prune: {{model: {tiny_model_dir}, method: wanda, sparsity: 0.5, calib: c4, calib_samples: 2,"
        " seqlen: 32}\n"
        "  - eval: {models: ['@prune'], ppl: [wikitext2], seqlen: 64, limit_windows: 2}\n"
    )
    dropped = (*OFFLINE_VARS, data.DATA_DIR_ENV)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k not in dropped}
    env.update(
        PYTHONPATH=str(ROOT),
        HF_ENDPOINT=closed_port_url(),
        SPARSETUNE_HUB_TIMEOUT="2",
        HF_HOME=str(tmp_path / "hf-home"),
        OMP_NUM_THREADS="1",
    )
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "sparsetune", "run", str(recipe), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert not re.search(r"retr(y|ying|ies)", log, re.IGNORECASE), log
    assert len(re.findall(r"hub http://127\.0\.0\.1:\d+ unreachable", log)) == 1, log
    assert len(re.findall(r"c4 \(train\): .*using the embedded sample", log)) == 1, log
    assert len(re.findall(r"wikitext2 \(test\): .*using the embedded sample", log)) == 1, log

    report = json.loads((out / "01-prune" / "sparsity_report.json").read_text())
    assert report["calibration"]["source"] == "c4 (embedded sample)"
    evaluated = json.loads((out / "02-eval" / "eval.json").read_text())
    measured = evaluated["models"][0]["ppl"]["wikitext2"]
    assert measured["dataset"] == "wikitext2 (embedded sample)"
    assert "| ppl wikitext2 (embedded sample) |" in (out / "02-eval" / "eval.md").read_text()

    # The figure itself: the HF rows of the published test file joined with "\n\n", first two windows of 64.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = (SAMPLES / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    text = "\n\n".join(line if line.strip() else "" for line in raw.splitlines(keepends=True))
    tokenizer = AutoTokenizer.from_pretrained(out / "01-prune")
    ids = torch.tensor(tokenizer(text)["input_ids"][:128]).view(2, 64)
    model = AutoModelForCausalLM.from_pretrained(out / "01-prune").eval()
    with torch.inference_mode():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in ids]
    assert measured["ppl"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)
