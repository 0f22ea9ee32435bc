"""Writing results safely: temp dir + rename, refusal to clobber, and run metadata (versions, memory).

Next to an output dir OUT (in OUT's parent), a run may leave:
  .OUT.tmp-<pid>-<rand>  the result process <pid> is writing (renamed to OUT when complete)
  .OUT.old-<pid>         the previous OUT, moved aside by an --overwrite commit for the moment between two renames
  .OUT.lock              the commit lock (flock), holding the committing pid; removed after each commit
  OUT.unsaved-<pid>      a finished result that was not committed because another run wrote OUT meanwhile
The first two are cleaned up (finished or rolled back) by the next run that writes OUT, once <pid> is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparsetune.errors import SparsetuneError

log = logging.getLogger(__name__)

# What each output path held when its run was validated (check_output_dir), as (st_dev, st_ino) or None for
# absent. A commit replaces only that dir: if another run committed in the meantime, this one loses.
_STATE_AT_START: dict[Path, tuple[int, int] | None] = {}


class OutputExistsError(SparsetuneError):
    """Another run wrote the output dir first; this run's finished result was kept in `kept`."""

    def __init__(self, message: str, kept: Path) -> None:
        super().__init__(message)
        self.kept = kept


def check_output_dir(output: str | os.PathLike[str], overwrite: bool, inputs: tuple[str, ...] = ()) -> Path:
    """Validate an output dir before any work starts, so bad input fails fast and writes nothing.

    Also cleans up what killed runs left next to it (see `recover_output_dir`) and records what the dir
    holds now, so that the commit at the end replaces nothing else.
    """
    out = Path(output).expanduser().resolve()
    for src in inputs:
        src_path = Path(src).expanduser()
        if src_path.exists():
            src_path = src_path.resolve()
            if out == src_path or src_path in out.parents or out in src_path.parents:
                raise SparsetuneError(
                    f"output dir {out} overlaps the input {src_path}; choose another --output "
                    "(sparsetune never overwrites its input)"
                )
    check_parent_writable(out)
    recover_output_dir(out)
    if out.exists() and not overwrite:
        raise SparsetuneError(f"output dir {out} already exists; pass --overwrite or choose another --output")
    if out.exists() and not out.is_dir():
        raise SparsetuneError(f"output path {out} is a file, not a directory; choose another --output")
    _STATE_AT_START[out] = _identity(out)
    return out


def check_parent_writable(out: Path) -> None:
    """`out`'s parent must exist or be creatable (as `mkdir -p` would) and accept new entries.

    The check makes (and removes) a real temp dir in the nearest existing ancestor instead of asking
    `os.access`: root passes `os.access` everywhere, yet cannot create entries in /proc or on a read-only mount.
    A missing parent is not created here (that happens at the commit), so a refused run leaves nothing behind.
    """
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SparsetuneError(
            f"cannot create output dir {out}: {ancestor} is a file, not a directory; choose another -o"
        )
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=ancestor)
    except OSError as err:
        raise SparsetuneError(
            f"cannot create output dir {out}: {ancestor} is not writable ({err.strerror}); "
            "choose another -o or fix the permissions"
        ) from err
    os.rmdir(probe)


# --------------------------------------------------------------------------------------------- crash leftovers


def _leftovers(out: Path) -> list[tuple[str, int, Path]]:
    """[(kind, pid, path)] of the `.OUT.tmp-<pid>-*` and `.OUT.old-<pid>` dirs next to `out`."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)(?:-[a-z0-9_]+)?")
    found = []
    with contextlib.suppress(OSError):
        for path in out.parent.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.append((match.group(1), int(match.group(2)), path))
    return sorted(found, key=lambda item: str(item[2]))


def pid_alive(pid: int) -> bool:
    """True unless no process has this pid (a pid we may not signal belongs to a live process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # larger than any pid
        return False
    return True


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def recover_output_dir(out: Path) -> None:
    """Clean up after runs that were killed while writing `out` (their pids are gone).

    - `.OUT.old-<pid>` means the kill hit an --overwrite commit between its two renames. The new result in
      `.OUT.tmp-<pid>-*` was complete before the first rename, so the swap is finished; without it, the old dir
      is put back. If OUT exists, the swap had finished and only the old copy is removed.
    - Any other `.OUT.tmp-<pid>-*` is an unfinished result and is removed.
    Each action is reported in one log line. Temp dirs of live processes are left alone.
    """
    dead = [item for item in _leftovers(out) if not pid_alive(item[1])]
    if not dead:
        return
    with _commit_lock(out):
        for kind, pid, old in dead:
            if kind != "old" or not old.exists():
                continue
            new = [path for k, p, path in dead if k == "tmp" and p == pid and path.exists()]
            if not out.exists():
                rename_noreplace(new[-1] if new else old, out)
                what = "finished" if new else "rolled back"
                log.warning("%s the --overwrite of %s that process %d was killed in", what, out, pid)
            shutil.rmtree(old, ignore_errors=True)
        stale = [(pid, path) for kind, pid, path in dead if kind == "tmp" and path.exists()]
        if stale:
            size = sum(_dir_bytes(path) for _, path in stale)
            for _, path in stale:
                shutil.rmtree(path, ignore_errors=True)
            pids = ", ".join(sorted({str(pid) for pid, _ in stale}))
            log.warning(
                "removed %d unfinished temp dir(s) of %s left by killed runs (pid %s), %.1f MB",
                len(stale),
                out,
                pids,
                size / 1e6,
            )


# --------------------------------------------------------------------------------------------- the commit


@contextlib.contextmanager
def _commit_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on `.OUT.lock` (which holds our pid) for the renames of a commit or a recovery.

    The lock file is removed on release, so nothing is left next to OUT. A process that waited on the file
    meanwhile finds it gone (or replaced) after it wakes up and takes the lock again on the current file.
    """
    path = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.unlink(path)
        os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).renameat2
    return None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists.

    Plain rename(2) onto an existing *empty* dir silently replaces it, so it cannot refuse a clobber by itself.
    Linux has renameat2(RENAME_NOREPLACE), which Python does not wrap; we call it through libc. Where it is
    missing (other systems, filesystems that answer EINVAL) we check and then rename: the commit lock makes
    that safe against other sparsetune runs, though not against other programs.
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _keep_unsaved(tmp: Path, out: Path) -> Path:
    """Move a finished result that lost the race to the visible `OUT.unsaved-<pid>` (or -<pid>-2, ...)."""
    for n in range(1, 1000):
        kept = out.with_name(f"{out.name}.unsaved-{os.getpid()}" + (f"-{n}" if n > 1 else ""))
        try:
            rename_noreplace(tmp, kept)
            return kept
        except FileExistsError:
            continue
    raise SparsetuneError(f"too many {out.name}.unsaved-* dirs next to {out}; remove the old ones")


def replaceable_state(out: Path, overwrite: bool) -> tuple[int, int] | None:
    """What a commit into `out` may replace: nothing without `overwrite`; with it, the dir `out` held when this
    run was validated (check_output_dir), or holds now if it was not."""
    if not overwrite:
        return None
    return _STATE_AT_START[out] if out in _STATE_AT_START else _identity(out)


def commit_output_dir(tmp: Path, out: Path, expected: tuple[int, int] | None) -> None:
    """Rename the finished `tmp` to `out`, atomically and without clobbering another run's result.

    `out` may be absent, or still be the dir `expected` (from `replaceable_state`), which is then replaced.
    Anything else means another run committed while this one worked: this one loses, its result is kept in
    `OUT.unsaved-<pid>`, and OutputExistsError names that dir (exit 2). The lock serialises commits, and a
    non-replacing rename refuses even an empty dir, so two runs never both report success for one dir.
    """
    with _commit_lock(out):
        current = _identity(out)
        try:
            if current is None:
                rename_noreplace(tmp, out)
            elif current == expected:
                old = out.with_name(f".{out.name}.old-{os.getpid()}")  # a kill here is recovered on the next start
                os.rename(out, old)
                rename_noreplace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
        except FileExistsError:
            kept = _keep_unsaved(tmp, out)
            how = "replaced" if expected is not None else "written"
            raise OutputExistsError(
                f"output dir {out} was {how} by another run while this one worked; this run's result is kept in "
                f"{kept}; move it where you want it or run again with another --output",
                kept,
            ) from None


def default_dir_mode() -> int:
    """The mode `mkdir` gives under the current umask (mkdtemp always makes 0700)."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `output`; on success rename it into place, on failure remove it.

    A crash never leaves a half-written result at `output`. Whether `output` may be replaced is decided at
    the rename (see `commit_output_dir`), so a run that loses a race keeps its finished result.
    """
    out = Path(output).expanduser().resolve()
    if out not in _STATE_AT_START:  # not validated by check_output_dir: clean up here
        recover_output_dir(out)
    expected = replaceable_state(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(default_dir_mode())
        commit_output_dir(tmp, out, expected)
        _STATE_AT_START.pop(out, None)  # a later run of this process into `out` starts from what is there then
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # after a lost race tmp is already OUT.unsaved-<pid>
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """write_json through a temp file and a rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_json(tmp, obj)
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    names = [
        "sparsetune",
        "torch",
        "transformers",
        "accelerate",
        "datasets",
        "safetensors",
        "peft",
        "lm_eval",
    ]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_memory() -> dict[str, int]:
    """Peak host RSS and, on CUDA, peak allocated device memory."""
    import torch

    mem = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        mem["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return mem
