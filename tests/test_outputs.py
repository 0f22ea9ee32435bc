"""Output dirs under concurrency and crashes (issue 20): no-clobber commits, the commit lock, recovery of what
killed runs leave, the umask, and writable-parent checks before any work."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsetune import outputs
from sparsetune.cli.app import app
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import OutputExistsError, atomic_output_dir, check_output_dir

runner = CliRunner(env={"COLUMNS": "250"})
DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: no process can have it


@pytest.fixture(params=["renameat2", "check-then-rename"])
def rename_kind(request, monkeypatch):
    """Run a test with libc's renameat2(RENAME_NOREPLACE) and with the fallback used where it is missing."""
    if request.param == "renameat2":
        assert outputs._renameat2() is not None, "this Linux libc should have renameat2"
    else:
        monkeypatch.setattr(outputs, "_renameat2", lambda: None)
    return request.param


def _who(path: Path) -> str:
    return (path / "who").read_text()


# --------------------------------------------------------------------------------------------- two writers


def test_the_run_that_commits_second_loses_and_keeps_its_result(tmp_path, rename_kind):
    """Both runs start while OUT is absent; `fast` commits while `slow` is still writing."""
    out = tmp_path / "out"
    check_output_dir(out, overwrite=False)
    with pytest.raises(OutputExistsError) as lost, atomic_output_dir(out) as slow:
        (slow / "who").write_text("slow")
        with atomic_output_dir(out) as fast:
            (fast / "who").write_text("fast")
    assert _who(out) == "fast"
    kept = lost.value.kept
    assert kept == tmp_path / f"out.unsaved-{os.getpid()}" and _who(kept) == "slow"
    assert str(kept) in str(lost.value) and "another run" in str(lost.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", kept.name]  # no temp dir, no lock file


def test_an_empty_dir_created_meanwhile_is_not_replaced(tmp_path, rename_kind):
    """rename(2) replaces an empty dir without complaint; the commit must not."""
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError) as lost, atomic_output_dir(out) as tmp:
        (tmp / "who").write_text("mine")
        out.mkdir()  # e.g. another program, or a user's mkdir
    assert list(out.iterdir()) == [] and _who(lost.value.kept) == "mine"


def test_two_overwriting_runs_never_both_succeed(tmp_path, rename_kind):
    """--overwrite replaces the dir that was there at the start, not a result another run committed meanwhile."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "who").write_text("original")
    check_output_dir(out, overwrite=True)
    with pytest.raises(OutputExistsError) as lost, atomic_output_dir(out, overwrite=True) as slow:
        (slow / "who").write_text("slow")
        with atomic_output_dir(out, overwrite=True) as fast:
            (fast / "who").write_text("fast")
    assert _who(out) == "fast" and _who(lost.value.kept) == "slow"
    assert "replaced by another run" in str(lost.value)
    # a single overwriting run still replaces the old dir, and leaves nothing else behind
    check_output_dir(out, overwrite=True)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "who").write_text("third")
    assert _who(out) == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", lost.value.kept.name]


def test_the_renames_happen_under_the_lock_file_holding_our_pid(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    seen = []
    real_rename = outputs.rename_noreplace

    def checking_rename(src, dst):
        lock = tmp_path / ".out.lock"
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # another open file description cannot take it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen.append((lock.read_text().strip(), sorted(p.name for p in tmp_path.iterdir() if p.name != ".out.lock")))
        real_rename(src, dst)

    monkeypatch.setattr(outputs, "rename_noreplace", checking_rename)
    check_output_dir(out, overwrite=True)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "who").write_text("new")
    # during the swap OUT is away under the name the recovery looks for, and the new result is the pid's temp dir
    pid = os.getpid()
    assert seen == [(str(pid), [f".out.old-{pid}", tmp.name])] and tmp.name.startswith(f".out.tmp-{pid}-")
    assert _who(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_prune_that_loses_the_race_exits_2_and_names_its_saved_result(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """Another run commits OUT between this run's work and its commit (the hook simulates it)."""
    out = tmp_path / "out"
    real_commit = outputs.commit_output_dir

    def other_run_commits_first(tmp, target, expected):
        target.mkdir()
        (target / "who").write_text("other run")
        real_commit(tmp, target, expected)

    monkeypatch.setattr(outputs, "commit_output_dir", other_run_commits_first)
    args = ["prune", str(tiny_model_dir), "--calib", str(text_file), "--calib-samples", "2", "--seqlen", "16"]
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    kept = tmp_path / f"out.unsaved-{os.getpid()}"
    assert len(errors) == 1 and str(kept) in errors[0] and "Traceback" not in result.output
    assert _who(out) == "other run"
    assert json.loads((kept / "sparsity_report.json").read_text())["target_sparsity"] == 0.5
    assert (kept / "model.safetensors.index.json").is_file() and (kept / "recipe.yaml").is_file()


# --------------------------------------------------------------------------------------------- crash leftovers


def _dir_with(path: Path, who: str, size: int = 0) -> Path:
    path.mkdir()
    (path / "who").write_text(who)
    if size:
        (path / "model.safetensors").write_bytes(b"\0" * size)
    return path


def test_stale_temp_dirs_of_dead_processes_are_removed_in_one_line(tmp_path, caplog):
    out = tmp_path / "out"
    stale = [_dir_with(tmp_path / f".out.tmp-{DEAD_PID}-ab_12c", "dead", 3_000_000)]
    stale.append(_dir_with(tmp_path / f".out.tmp-{DEAD_PID + 1}-zz9", "dead too", 1_000_000))
    live = _dir_with(tmp_path / f".out.tmp-{os.getpid()}-x1", "live")  # a run still writing
    other = _dir_with(tmp_path / f".other.tmp-{DEAD_PID}-q", "another target")
    with caplog.at_level(logging.WARNING, logger="sparsetune.outputs"):
        check_output_dir(out, overwrite=False)
    assert not any(p.exists() for p in stale) and live.exists() and other.exists() and not out.exists()
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "removed 2 unfinished temp dir(s)" in line and str(DEAD_PID) in line and "4.0 MB" in line


@pytest.mark.parametrize(
    "state, expected",
    [
        ("old + new, no OUT", "new"),  # killed between the renames: finish the swap
        ("old only, no OUT", "old"),  # the new dir is gone too: roll back
        ("old + OUT", "new"),  # killed while removing the old copy: just remove it
    ],
)
def test_an_overwrite_killed_mid_swap_is_finished_or_rolled_back(tmp_path, state, expected, caplog):
    out = tmp_path / "out"
    _dir_with(tmp_path / f".out.old-{DEAD_PID}", "old")
    if state == "old + new, no OUT":
        _dir_with(tmp_path / f".out.tmp-{DEAD_PID}-k3j", "new")
    if state == "old + OUT":
        _dir_with(out, "new")
    caplog.set_level(logging.WARNING, logger="sparsetune.outputs")
    with pytest.raises(SparsetuneError, match="already exists"):  # recovered first, then refused as usual
        check_output_dir(out, overwrite=False)
    assert _who(out) == expected and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    if state != "old + OUT":
        action = "finished" if expected == "new" else "rolled back"
        assert [r.getMessage().split(" the ")[0] for r in caplog.records] == [action]


def test_leftovers_of_a_live_process_are_left_alone(tmp_path):
    out = tmp_path / "out"
    old = _dir_with(tmp_path / f".out.old-{os.getpid()}", "old")
    check_output_dir(out, overwrite=False)
    assert old.exists() and not out.exists()


# --------------------------------------------------------------------------------------------- mode and parents


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)])
def test_the_output_dir_gets_the_umask_mode(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "who").write_text("x")
    finally:
        os.umask(before)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode


def test_missing_parents_are_fine_and_are_not_created_by_the_check(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b" / "out", overwrite=False)
    assert out == tmp_path / "a" / "b" / "out" and list(tmp_path.iterdir()) == []


def _fail_if_called(*args, **kwargs):
    raise AssertionError("work started before the output dir was checked")


def _command_args(command: str, model: Path, text: Path, out: Path) -> list[str]:
    if command == "run":
        recipe = text.parent / "run.yaml"
        recipe.write_text(f"stages:\n  - prune: {{model: {model}, calib: {text}, calib_samples: 2, seqlen: 16}}\n")
        return ["run", str(recipe), "-o", str(out)]
    return {
        "prune": ["prune", str(model), "--calib", str(text)],
        "export": ["export", str(model)],
        "eval": ["eval", str(model), "--ppl", str(text)],
        "seft": ["seft", str(model), "--data", str(text)],
        "smet-pretrain": ["smet-pretrain", "--data", str(text), "--tokenizer", str(model)],
        "sweep": ["sweep", str(model), "--ppl", str(text), "--calib", str(text)],
    }[command] + ["-o", str(out)]


COMMANDS = ["prune", "export", "eval", "seft", "smet-pretrain", "sweep", "run"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_file_is_refused_before_any_work(command, tiny_model_dir, text_file, tmp_path, monkeypatch):
    """A path component that is a file: the one unwritable parent every user (root too) can produce."""
    monkeypatch.setattr("sparsetune.loading.load_model", _fail_if_called)
    monkeypatch.setattr("sparsetune.loading.load_tokenizer", _fail_if_called)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    result = runner.invoke(app, _command_args(command, tiny_model_dir, text_file, blocker / "sub" / "out"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{blocker} is a file, not a directory" in errors[0], result.output
    assert blocker.read_text() == "a file"


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
@pytest.mark.parametrize("command", ["prune", "eval", "run"])
def test_an_output_where_nothing_can_be_made_is_refused_for_root_too(command, tiny_model_dir, text_file, monkeypatch):
    """/proc accepts no new entries, for root too (where os.access would say yes)."""
    monkeypatch.setattr("sparsetune.loading.load_model", _fail_if_called)
    result = runner.invoke(app, _command_args(command, tiny_model_dir, text_file, Path("/proc/sparsetune-out/x")))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/proc is not writable" in errors[0], result.output


# Root writes into a 0555 dir anyway, so as root the check runs in a child that has dropped to `nobody`.
READ_ONLY_CHECK = """
import os, sys
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import check_output_dir
if os.geteuid() == 0:  # after the imports: nobody may not read root's Python install
    os.setgid(65534)
    os.setuid(65534)
try:
    check_output_dir(sys.argv[1], overwrite=False)
except SparsetuneError as err:
    print(err)
    sys.exit(2)
"""


def test_a_read_only_parent_is_refused():
    import subprocess
    import sys
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="sparsetune-ro-", dir="/tmp"))  # not under root's 0700 pytest dir
    parent = root / "ro"
    try:
        root.chmod(0o755)
        parent.mkdir(mode=0o555)
        if os.geteuid() == 0:
            os.chown(parent, 65534, 65534)  # nobody's own dir, read-only: only the mode stops the write
        parent.chmod(0o555)  # mkdir's mode is masked by the umask
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY_CHECK, str(parent / "out")], env=env, capture_output=True, text=True
        )
        assert done.returncode == 2, done.stdout + done.stderr
        assert "is not writable" in done.stdout, done.stdout
        assert list(parent.iterdir()) == []  # the probe left nothing behind
    finally:
        parent.chmod(0o755)
        import shutil

        shutil.rmtree(root)
