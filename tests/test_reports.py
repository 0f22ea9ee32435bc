"""The stage contract (`sparsetune.reports`): one owner of the report file's name, its schema version, its typed
fields and its reading and writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsetune import reports
from sparsetune.errors import SparsetuneError

PACKAGE = Path(__file__).resolve().parents[1] / "sparsetune"


def test_the_report_file_name_is_spelled_once_in_the_package():
    places = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "sparsity_report.json" in line
    ]
    assert places == ["reports.py:27"], places


def prune_like_report() -> dict:
    modules = {
        "model.layers.0.mlp.up_proj": {"shape": [8, 4], "zeros": 16, "numel": 32, "sparsity": 0.5},
        "model.layers.1.mlp.up_proj": {"shape": [8, 4], "zeros": 24, "numel": 32, "sparsity": 0.75, "rho": 3.0},
    }
    summary = {"method": "wanda", "pattern": "unstructured", "target_sparsity": 0.5, "global_sparsity": 0.625}
    return {"summary": summary, **summary, "modules": modules, "timings": {"prune_s": 1.0}}


def test_write_keeps_the_reports_keys_in_order_and_adds_the_schema_version_last(tmp_path):
    report = prune_like_report()
    reports.write_report(tmp_path, report)
    text = (tmp_path / reports.REPORT_FILE).read_text()
    assert text == json.dumps({**report, "schema_version": 1}, indent=2) + "\n"
    assert "schema_version" not in report  # the caller's dict is left as it was
    assert list(json.loads(text))[-1] == "schema_version" and reports.SCHEMA_VERSION == 1


def test_read_gives_the_typed_fields_and_keeps_every_section(tmp_path):
    reports.write_report(tmp_path, prune_like_report())
    report = reports.read_report(tmp_path)
    assert report is not None and (report.method, report.pattern, report.global_sparsity) == (
        "wanda",
        "unstructured",
        0.625,
    )
    up1 = report.modules["model.layers.1.mlp.up_proj"]
    assert (up1.zeros, up1.numel, up1.sparsity, up1.model_extra) == (24, 32, 0.75, {"shape": [8, 4], "rho": 3.0})
    assert report.schema_version == 1 and report.model_extra["timings"] == {"prune_s": 1.0}
    recorded = reports.recorded_sparsity(tmp_path)
    assert recorded == {"model.layers.0.mlp.up_proj": 0.5, "model.layers.1.mlp.up_proj": 0.75}


def test_a_dir_without_a_report_reads_as_none_and_an_old_report_as_version_1(tmp_path):
    assert reports.read_report(tmp_path) is None and reports.read_raw(tmp_path, "") is None
    assert reports.recorded_sparsity(tmp_path) is None and not reports.report_path(tmp_path).exists()
    (tmp_path / reports.REPORT_FILE).write_text(json.dumps({"method": "magnitude", "global_sparsity": 0.5}))
    report = reports.read_report(tmp_path)
    assert report is not None and (report.schema_version, report.modules) == (1, None)
    assert reports.recorded_sparsity(tmp_path) is None  # no per-module statistics to estimate from


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        (json.dumps({"modules": {"a": {"zeros": "many"}}}), "modules.a.zeros"),
        (json.dumps({"schema_version": 2}), "has schema version 2, newer than this sparsetune reads (1)"),
    ],
)
def test_a_bad_report_is_one_error_naming_the_file_and_the_fix(tmp_path, content, message):
    (tmp_path / reports.REPORT_FILE).write_text(content)
    fix = "upgrade sparsetune" if "newer" in message else "re-run the prune"  # the caller's fix, but for that
    with pytest.raises(SparsetuneError, match=fix) as err:
        reports.read_report(tmp_path, fix="re-run the prune")
    assert message in str(err.value) and str(tmp_path / reports.REPORT_FILE) in str(err.value)


def test_the_size_estimate_skips_entries_without_a_sparsity(tmp_path):
    modules = {"a": {"sparsity": 0.5}, "b": {"zeros": 1}, "c": "junk", "d": {"sparsity": 1}}
    (tmp_path / reports.REPORT_FILE).write_text(json.dumps({"modules": modules}))
    assert reports.recorded_sparsity(tmp_path) == {"a": 0.5, "d": 1.0}
    (tmp_path / reports.REPORT_FILE).write_text("{broken")
    assert reports.recorded_sparsity(tmp_path) is None  # an estimate: a damaged report costs only its precision
