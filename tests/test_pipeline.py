"""`sparsetune run` / `sparsetune validate`: the shipped recipes, plan resolution, errors with YAML lines,
stage skipping and resuming, gates, and the tiny prune -> seft -> eval -> export pipeline end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_weights, make_tiny_model, make_tokenizer, random_text
from typer.testing import CliRunner

from sparsetune import pipeline
from sparsetune.cli.app import app
from sparsetune.errors import SparsetuneError
from sparsetune.recipes import recipe_settings

runner = CliRunner()
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ shipped recipes


def test_every_required_recipe_ships():
    names = {p.stem for p in SHIPPED}
    assert {
        "wanda-50",
        "sparsegpt-2of4",
        "owl-wanda-70",
        "prune-seft-export",
        "smet-tiny",
        "sweep",
        "prune-70",
    } <= names


@pytest.mark.parametrize("recipe", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_validates(recipe):
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok {recipe}")


def _plan(name: str, *overrides: str, set_vars: tuple[str, ...] = ()) -> pipeline.Plan:
    return pipeline.plan_recipe(RECIPES / f"{name}.yaml", "/tmp/out", list(overrides), list(set_vars))


def test_shipped_recipes_say_what_their_names_say():
    wanda = _plan("wanda-50")
    assert [s.kind for s in wanda.stages] == ["prune", "eval"]
    prune = wanda.stages[0].config
    assert (prune.method, prune.sparsity, prune.pattern, prune.calib, prune.calib_samples, prune.calib_seqlen) == (
        "wanda",
        0.5,
        None,
        "c4",
        128,
        2048,
    )
    assert wanda.stages[1].config.models == ["smollm2", "/tmp/out/01-prune"]

    gpt = _plan("sparsegpt-2of4")
    assert [s.kind for s in gpt.stages] == ["prune", "eval", "export"]
    assert (gpt.stages[0].config.method, gpt.stages[0].config.pattern) == ("sparsegpt", "2:4")
    assert gpt.stages[2].config.format == "sparse-24-bitmask"
    assert gpt.stages[2].config.model == "/tmp/out/01-prune"

    owl = _plan("owl-wanda-70").stages[0].config
    assert (owl.method, owl.sparsity, owl.owl, owl.owl_m, owl.owl_lambda) == ("wanda", 0.7, True, 5.0, 0.08)

    pse = _plan("prune-seft-export")
    assert [s.kind for s in pse.stages] == ["prune", "seft", "eval", "export"]
    assert (pse.stages[0].config.method, pse.stages[0].config.sparsity) == ("wanda", 0.5)
    assert (pse.stages[1].config.method, pse.stages[1].config.data) == ("seft", "alpaca")
    assert pse.stages[1].config.model == "/tmp/out/01-prune"
    assert pse.stages[2].config.models == ["smollm2", "/tmp/out/01-prune", "/tmp/out/02-seft"]
    assert (pse.stages[3].config.format, pse.stages[3].config.model) == ("sparse-bitmask", "/tmp/out/02-seft")
    assert pse.gates == {"wikitext2_ppl_max": 90.0, "sparsity_min": 0.5}

    smet = _plan("smet-tiny")
    assert [s.kind for s in smet.stages] == ["smet-pretrain", "eval", "export"]
    assert (smet.stages[0].config.model_config_name, smet.stages[0].config.density) == ("tiny", 0.5)
    assert smet.stages[0].inputs == []
    assert smet.stages[1].config.models == ["/tmp/out/01-smet-pretrain"]

    p70 = _plan("prune-70")
    assert [s.kind for s in p70.stages] == ["prune", "seft", "eval"]
    assert (p70.stages[0].config.method, p70.stages[0].config.sparsity) == ("auto", 0.7)
    calib = p70.stages[0].config
    seft = p70.stages[1].config
    assert seft.skip_tokens == calib.calib_samples * calib.calib_seqlen  # trains past the calibration tokens
    assert (seft.method, seft.lr, seft.distill_loss) == ("masked-ft", 1e-3, "none")
    deltas = _plan("prune-70", set_vars=("method=seft",)).stages[1].config
    assert (deltas.method, deltas.lr, deltas.delta_rank) == ("seft", 1e-3, 16)
    distilled = _plan("prune-70", set_vars=("distill=squarehead",)).stages[1].config
    assert (distilled.distill_loss, distilled.distill_from) == ("squarehead", None)  # teacher: the prune's source
    assert p70.stages[2].config.models == ["smollm2", "/tmp/out/01-prune", "/tmp/out/02-seft"]

    sweep = _plan("sweep").stages[0].config
    assert (sweep.methods, sweep.sparsities, sweep.patterns) == (
        ["wanda", "sparsegpt", "magnitude"],
        [0.3, 0.5, 0.6, 0.7],
        ["2:4"],
    )


def test_an_override_under_a_renamed_settings_old_name_replaces_the_recipes_value():
    """Old names stay for one release: `prune.seqlen` sets the recipe's `calib_seqlen`, `=null` drops it, and the
    new name replaces an old one the same way; smet's `warmup_ratio` R reads as int(R x steps) warmup steps."""
    assert _plan("wanda-50", "prune.seqlen=32").stages[0].config.calib_seqlen == 32
    assert _plan("wanda-50", "prune.seqlen=null").stages[0].config.calib_seqlen == 2048  # the default
    again = _plan("wanda-50", "prune.seqlen=32", "prune.calib_seqlen=16")
    assert again.stages[0].config.calib_seqlen == 16
    assert again.stages[0].settings()["calib_seqlen"] == 16 and "seqlen" not in again.stages[0].settings()
    smet = _plan("smet-tiny", "smet-pretrain.warmup_ratio=0.1").stages[0].config
    assert (smet.steps, smet.warmup_steps, smet.warmup) == (200, 20, 20)
    assert _plan("smet-tiny").stages[0].config.warmup == 200 // 20  # the default: 5% of the steps, as before


def test_a_run_dir_from_before_a_rename_still_resumes():
    """Stage hashes from before `prune --seqlen` became `--calib-seqlen` (the shipped recipes then said `seqlen`)."""
    hashes = [pipeline.stage_hashes(s)["settings_hash"] for s in _plan("prune-seft-export").stages]
    assert hashes == ["93a88569c1d2083d", "50fc6cd49c032aad", "97cbbc3078a07dca", "26705b5c8799797f"]
    assert pipeline.stage_hashes(_plan("wanda-50", "prune.seqlen=2048").stages[0])["settings_hash"] == hashes[0]


def test_a_command_recipe_can_be_a_run_recipe():
    """`sparsetune prune --recipe recipes/wanda-50.yaml` reads the recipe's one prune stage (vars at defaults)."""
    settings = recipe_settings(RECIPES / "wanda-50.yaml", "prune")
    assert settings == {
        "model": "smollm2",
        "method": "wanda",
        "sparsity": 0.5,
        "calib": "c4",
        "calib_samples": 128,
        "calib_seqlen": 2048,
    }
    assert "models" not in recipe_settings(RECIPES / "wanda-50.yaml", "eval")  # @prune is a run-only reference
    with pytest.raises(SparsetuneError, match="has 0 seft stages"):
        recipe_settings(RECIPES / "wanda-50.yaml", "seft")


# ------------------------------------------------------------------------------------------ plan resolution


def test_overrides_and_variables():
    plan = _plan("sparsegpt-2of4", "prune.sparsity=0.6", "prune.calib_samples=16", set_vars=("model=some/model",))
    prune = plan.stages[0].config
    assert (prune.sparsity, prune.pattern, prune.calib_samples, prune.model) == (0.6, None, 16, "some/model")
    assert plan.stages[1].config.models == ["some/model", "/tmp/out/01-prune"]
    back = _plan("wanda-50", "prune.pattern=4:8").stages[0].config
    assert (back.sparsity, back.pattern) == (None, "4:8")
    default = _plan("wanda-50", "prune.calib_samples=null").stages[0].config
    assert default.calib_samples == 128 == pipeline.PruneConfig.model_fields["calib_samples"].default
    gates = _plan("wanda-50", "gates.wikitext2_ppl_max=70", "gates.sparsity_min=null").gates
    assert gates == {"wikitext2_ppl_max": 70.0}


def test_embedded_variables_become_text_and_whole_ones_keep_their_type(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "vars: {root: /data, s: 0.6}\n"
        "stages:\n"
        "  - prune: {model: '${root}/model', sparsity: '${s}', calib: '${root}/calib.txt'}\n"
    )
    cfg = pipeline.plan_recipe(recipe, tmp_path / "out").stages[0].config
    assert (cfg.model, cfg.sparsity, cfg.calib) == ("/data/model", 0.6, "/data/calib.txt")


BAD_RECIPES = {
    "unknown key": ("stages:\n  - prune:\n      model: m\n      sparsitty: 0.5\n", "line 4", "unknown key 'sparsitty'"),
    "bad value": ("stages:\n  - prune:\n      model: m\n      sparsity: 1.5\n", "line 4", "outside [0, 1)"),
    "bad method": ("stages:\n  - prune:\n      model: m\n      method: obs\n", "line 4", "method"),
    "export before prune": (
        "stages:\n  - export: {format: sparse-bitmask}\n  - prune: {model: m}\n",
        "line 2",
        "has no input model",
    ),
    "seft first": ("stages:\n  - seft: {data: alpaca}\n", "line 2", "has no input model"),
    "eval first": ("stages:\n  - eval: {ppl: [wikitext2]}\n", "line 2", "has no input model"),
    "reference to a later stage": (
        "stages:\n  - prune: {model: m}\n  - export:\n      model: '@seft'\n  - seft: {}\n",
        "line 4",
        "names no earlier stage",
    ),
    "seft after export": (
        "stages:\n  - prune: {model: m}\n  - export: {}\n  - seft: {}\n",
        "line 4",
        "fine-tune before exporting",
    ),
    "unknown stage": ("stages:\n  - prune: {model: m}\n  - prun: {}\n", "line 3", "unknown stage kind 'prun'"),
    "undefined variable": ("stages:\n  - prune:\n      model: ${modle}\n", "line 3", "${modle} is not defined"),
    "unmeasured gate": (
        "stages:\n  - prune: {model: m}\n  - eval: {ppl: [c4]}\ngates:\n  wikitext2_ppl_max: 90\n",
        "line 5",
        "does not measure",
    ),
    "gate without bound side": ("stages:\n  - prune: {model: m}\ngates:\n  sparsity: 0.5\n", "line 4", "_min or _max"),
    "output in a stage": ("stages:\n  - prune: {model: m, output: x}\n", "line 2", "remove it"),
    "top-level typo": ("stage:\n  - prune: {model: m}\n", "line 1", "unknown key 'stage'"),
    "yaml syntax": ("stages:\n  - prune: {model: m\n", "line 3", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_validate_names_the_line_and_the_problem(tmp_path, case):
    text, line, message = BAD_RECIPES[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert f"bad.yaml {line}" in result.output
    assert message in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune.sparsity=abc"], "override prune.sparsity"),
        (["prun.sparsity=0.3"], "no stage named 'prun'"),
        (["gates.foo_max=3"], "does not measure"),
        (["--set", "modle=x"], "no variable 'modle'"),
        (["prune.sparsity"], "recipe prune.sparsity not found"),  # no '=': a second recipe path that does not exist
    ],
)
def test_bad_overrides_fail_in_one_line(args, message):
    result = runner.invoke(app, ["validate", str(RECIPES / "wanda-50.yaml"), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    args = ["run", str(RECIPES / "prune-seft-export.yaml"), "-o", str(out), "--dry-run", "seft.steps=20"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("01-prune  [prune]", "02-seft  [seft]", "03-eval  [eval]", "04-export  [export]"):
        assert text in result.output
    assert f"inputs: smollm2, {out}/01-prune, {out}/02-seft" in result.output
    assert "    steps: 20" in result.output and "    calib_samples: 128" in result.output
    assert "    replace_schedule: linear" in result.output  # defaults are shown too: every setting
    assert not out.exists()
    plan = json.loads(runner.invoke(app, [*args, "--json"]).output)
    assert [s["stage"] for s in plan["stages"]] == ["01-prune", "02-seft", "03-eval", "04-export"]


# ------------------------------------------------------------------------------------------ running


@pytest.fixture
def tiny_inputs(tmp_path) -> dict[str, Path]:
    dense = tmp_path / "dense"
    make_tiny_model("llama").save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(random_text(300, seed=i) for i in range(6)))
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n\n".join(random_text(300, seed=50 + i) for i in range(2)))
    alpaca = tmp_path / "alpaca.json"
    records = [
        {"instruction": random_text(8, seed=i), "input": "", "output": random_text(12, seed=200 + i)} for i in range(16)
    ]
    alpaca.write_text(json.dumps(records))
    return {"model": dense, "calib": calib, "heldout": heldout, "alpaca": alpaca}


def tiny_pse_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """The shipped prune-seft-export recipe, scaled down to the tiny model by variables and overrides."""
    return [
        "run",
        str(RECIPES / "prune-seft-export.yaml"),
        "-o",
        str(out),
        "--set",
        f"model={inputs['model']}",
        "--set",
        f"calib={inputs['calib']}",
        "--set",
        f"train_data={inputs['alpaca']}",
        "--set",
        f"ppl_data={inputs['heldout']}",
        "--set",
        "steps=4",
        "prune.calib_samples=4",
        "prune.seqlen=32",
        "seft.seqlen=96",
        "seft.batch_size=4",
        "seft.reselect_every=2",
        "seft.select_window=1",
        "seft.delta_rank=4",
        "seft.checkpoint_every=2",
        "eval.tasks=[]",
        "eval.seqlen=32",
        "gates.wikitext2_ppl_max=null",
        "gates.heldout_ppl_max=1e9",
        *extra,
    ]


def last_json(output: str) -> dict:
    """The JSON summary line (stderr progress bars share the captured output)."""
    line = [line for line in output.splitlines() if '{"' in line][-1]
    return json.loads(line[line.index('{"') :])


def decoder_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_weights(model_dir)
    return {k: v for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight")}


def test_prune_seft_eval_export_end_to_end_skips_finished_stages_and_gates(tmp_path, tiny_inputs):
    out = tmp_path / "run"
    result = runner.invoke(app, [*tiny_pse_args(tiny_inputs, out), "--check", "--json"])
    assert result.exit_code == 0, result.output
    summary = last_json(result.output)
    assert [s["status"] for s in summary["stages"]] == ["finished"] * 4
    assert summary["passed"] and {g["gate"] for g in summary["gates"]} == {"sparsity_min", "heldout_ppl_max"}

    # each stage read the one before it, and the sparsity survived every stage
    seft_report = json.loads((out / "02-seft" / "sparsity_report.json").read_text())
    assert seft_report["finetune_history"][-1]["steps"] == 4
    for w in decoder_weights(out / "02-seft").values():
        assert int((w == 0).sum()) == w.numel() // 2  # Wanda 50% per output row, kept exactly by SEFT
    evaluated = json.loads((out / "03-eval" / "eval.json").read_text())
    assert [m["model"] for m in evaluated["models"]] == [
        str(tiny_inputs["model"]),
        *(str(out / s) for s in ("01-prune", "02-seft")),
    ]
    seft_ppl = evaluated["models"][-1]["ppl"][str(tiny_inputs["heldout"])]["ppl"]
    assert summary["metrics"]["heldout_ppl"] == pytest.approx(seft_ppl)
    assert summary["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    dense_ppl = evaluated["models"][0]["ppl"][str(tiny_inputs["heldout"])]["ppl"]
    assert summary["metrics"]["heldout_ppl_vs_baseline"] == pytest.approx(seft_ppl / dense_ppl)
    config = json.loads((out / "04-export" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"

    from sparsetune.loading import load_model

    exported, _ = load_model(str(out / "04-export"), dtype="float32", device="cpu", need_tokenizer=False)
    state = exported.state_dict()
    for name, w in decoder_weights(out / "02-seft").items():  # the recipe exports bf16
        assert torch.equal(state[name], w.to(torch.bfloat16).float()), name

    # the same command again: everything is skipped and nothing is rewritten
    marker = out / ".stages" / "02-seft.json"
    mtime = (out / "02-seft" / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, [*tiny_pse_args(tiny_inputs, out), "--json"])
    assert again.exit_code == 0, again.output
    assert [s["status"] for s in last_json(again.output)["stages"]] == ["skipped"] * 4
    assert (out / "02-seft" / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads(marker.read_text())["status"] == "finished"

    # a changed seft setting re-runs seft and everything after it, not the prune
    changed = runner.invoke(app, [*tiny_pse_args(tiny_inputs, out), "seft.lr=3e-4", "--json"])
    assert changed.exit_code == 0, changed.output
    statuses = [s["status"] for s in last_json(changed.output)["stages"]]
    assert statuses == ["skipped", "finished", "finished", "finished"]

    # a failing gate: exit 1 with --check (the stages themselves are skipped, the gate is re-checked)
    failing = runner.invoke(
        app, [*tiny_pse_args(tiny_inputs, out), "seft.lr=3e-4", "gates.sparsity_min=0.9", "--check"]
    )
    assert failing.exit_code == 1
    assert "gate failed: sparsity_min" in failing.output
    assert "FAIL" in failing.output


def test_refuses_a_foreign_output_dir_and_an_input_overlap(tmp_path, tiny_inputs):
    foreign = tmp_path / "taken"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = runner.invoke(app, tiny_pse_args(tiny_inputs, foreign))
    assert result.exit_code == 2
    assert "not a `sparsetune run` dir" in result.output and "--overwrite" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    inside = tiny_inputs["model"] / "runs"
    result = runner.invoke(app, tiny_pse_args(tiny_inputs, inside))
    assert result.exit_code == 2 and "inside the input" in result.output
    assert not inside.exists()
    missing = runner.invoke(app, ["run", str(RECIPES / "wanda-50.yaml")])
    assert missing.exit_code == 2 and "missing --output" in missing.output


def test_a_crash_mid_stage_resumes_from_the_stage_checkpoint_exactly(tmp_path, tiny_inputs, monkeypatch, caplog):
    """Kill the seft stage after its step-2 checkpoint; the re-run skips prune, resumes seft from step 2, and
    ends with weights bit-identical to an uninterrupted run."""
    from sparsetune.train import seft as seft_run

    def plan(out: Path) -> pipeline.Plan:
        args = tiny_pse_args(tiny_inputs, out)[4:]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        overrides = [a for a in args if "=" in a and a not in sets]
        return pipeline.plan_recipe(RECIPES / "prune-seft-export.yaml", out, overrides, sets)

    clean = tmp_path / "clean"
    pipeline.run_plan(plan(clean), verbose_output=False)

    crashed = tmp_path / "crashed"
    original = seft_run.FinetuneRun.save_checkpoint

    def save_then_crash(self):
        original(self)
        if self.state.step == 2:
            raise RuntimeError("simulated crash after the step-2 checkpoint")

    monkeypatch.setattr(seft_run.FinetuneRun, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run_plan(plan(crashed), verbose_output=False)
    monkeypatch.setattr(seft_run.FinetuneRun, "save_checkpoint", original)
    assert json.loads((crashed / ".stages" / "02-seft.json").read_text())["status"] == "running"
    assert not (crashed / "02-seft").exists()  # no half-written stage output

    prune_mtime = (crashed / "01-prune" / "model.safetensors.index.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        summary = pipeline.run_plan(plan(crashed), verbose_output=False)
    assert "02-seft: resuming from the checkpoint" in caplog.text
    assert "resumed from step 2" in caplog.text
    assert [s["status"] for s in summary["stages"]] == ["skipped", "finished", "finished", "finished"]
    assert (crashed / "01-prune" / "model.safetensors.index.json").stat().st_mtime_ns == prune_mtime
    log = [json.loads(line) for line in (crashed / "02-seft" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    want, got = decoder_weights(clean / "02-seft"), decoder_weights(crashed / "02-seft")
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_smet_stage_feeds_eval_and_export(tmp_path, tiny_inputs):
    """smet-tiny.yaml scaled down: pretraining from scratch, perplexity of the result, sparse export."""
    out = tmp_path / "smet"
    args = [
        "run",
        str(RECIPES / "smet-tiny.yaml"),
        "-o",
        str(out),
        "--set",
        f"data={tiny_inputs['calib']}",
        "--set",
        f"ppl_data={tiny_inputs['heldout']}",
        "--set",
        "steps=3",
        f"smet-pretrain.tokenizer={tiny_inputs['model']}",
        "smet-pretrain.seqlen=32",
        "smet-pretrain.batch_size=4",
        "smet-pretrain.update_interval=2",
        "smet-pretrain.eval_every=0",
        "eval.seqlen=32",
        "--check",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = last_json(result.output)
    assert [s["stage"] for s in summary["stages"]] == ["01-smet-pretrain", "02-eval", "03-export"]
    assert summary["metrics"]["heldout_ppl"] > 1.0
    assert 0.45 <= summary["metrics"]["sparsity"] <= 0.55
    assert (out / "03-export" / "config.json").exists()


def test_a_crashed_sweep_stage_resumes_from_its_finished_points(tmp_path, tiny_inputs, monkeypatch, caplog):
    from sparsetune import sweep

    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(
        "stages:\n"
        "  - sweep:\n"
        f"      model: {tiny_inputs['model']}\n"
        "      methods: [magnitude]\n"
        "      sparsities: [0.3, 0.5, 0.7]\n"
        f"      ppl: [{tiny_inputs['heldout']}]\n"
        "      seqlen: 32\n"
    )
    out = tmp_path / "run"
    original = sweep._write_json_atomic
    written: list[str] = []

    def write_then_crash(path, obj):
        original(path, obj)
        if path.parent.name == "points":
            written.append(path.name)
            if len(written) == 2:
                raise RuntimeError("simulated crash after two points")

    monkeypatch.setattr(sweep, "_write_json_atomic", write_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run_plan(pipeline.plan_recipe(recipe, out), verbose_output=False)
    monkeypatch.setattr(sweep, "_write_json_atomic", original)
    with caplog.at_level("INFO"):
        summary = pipeline.run_plan(pipeline.plan_recipe(recipe, out), verbose_output=False)
    assert "resuming the unfinished sweep" in caplog.text
    assert "2 of 4 points already finished" in caplog.text  # the dense reference point and one sparsity
    assert summary["stages"][0]["status"] == "finished"
    points = json.loads((out / "01-sweep" / "sweep.json").read_text())["points"]
    assert [p["target_sparsity"] for p in points if p["method"] == "magnitude"] == [0.3, 0.5, 0.7]


@pytest.mark.dist
def test_two_processes_run_the_pipeline_like_one(tmp_path, tiny_inputs):
    """`torchrun --nproc_per_node 2 -m sparsetune run ...`: prune and seft share the work, eval and export run
    once on rank 0, and the result matches a one-process run (same global batch) to 1e-5 with the same masks."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    for name, launcher in (("one", [sys.executable]), ("two", [torchrun, "--standalone", "--nproc_per_node", "2"])):
        args = tiny_pse_args(tiny_inputs, tmp_path / name, "--check", "--json")
        done = subprocess.run([*launcher, "-m", "sparsetune", *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        summaries = [line for line in done.stdout.splitlines() if line.startswith('{"recipe"')]
        assert len(summaries) == 1  # only rank 0 reports
        assert [s["status"] for s in json.loads(summaries[0])["stages"]] == ["finished"] * 4
    a, b = decoder_weights(tmp_path / "one" / "02-seft"), decoder_weights(tmp_path / "two" / "02-seft")
    for name in a:
        assert torch.equal(a[name] != 0, b[name] != 0), f"{name}: masks differ"
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), f"{name}: {(a[name] - b[name]).abs().max()}"
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["metrics"]
    assert two["heldout_ppl"] == pytest.approx(one["heldout_ppl"], rel=1e-4)
