"""Stage output folders: written whole or not at all (atomic_dir), never over what a stage does
not own, and the names of the files that later stages read from them."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

MARKER = ".finetune-output"  # written into every folder atomic_dir creates: proof that a stage owns it


TEMP_MARKER = ".finetune-writing"  # in a temporary folder while it is written: stage, host, pid, process start


log = logging.getLogger("finetune")


class UnsafeOutput(Exception):
    """An output folder that a stage must not replace: it would delete files the stage did not write."""


class DiskFull(UnsafeOutput):
    """An output could not be written whole: no space left. The previous complete folder is kept."""


def _norm(path: str | Path) -> Path:
    return Path(os.path.abspath(path))  # '.', '..' and './x' resolved against the cwd, symlinks left alone


def check_output_place(final: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Return ``final`` as an absolute path if a stage may write into it, else raise UnsafeOutput naming why:
    never the cwd or one of its ancestors (the project root), nor a folder holding the stage's own ``inputs``."""
    out = _norm(final)
    if out.is_symlink():  # replacing the folder would replace the link, not write where it points
        raise UnsafeOutput(f"output folder {final}: is a symbolic link (to {os.readlink(out)}); give the real folder "
                           f"it points to, or a new folder")
    cwd = _norm(Path.cwd())
    real = out.resolve()
    if out == cwd or out in cwd.parents or real == cwd.resolve() or real in cwd.resolve().parents:
        raise UnsafeOutput(f"output folder {final}: is the current folder or one of its parents; "
                           f"give a folder of its own, e.g. out/<stage>")
    for src in inputs:
        src_abs, src_real = _norm(src), _norm(src).resolve()
        if out == src_abs or out in src_abs.parents or real == src_real or real in src_real.parents:
            raise UnsafeOutput(f"output folder {final}: contains the stage's input {src}; replacing it would "
                               f"delete the input. Give a separate output folder")
    if out.exists() and not out.is_dir():
        raise UnsafeOutput(f"output folder {final}: exists and is not a folder; refusing to replace it")
    return out


def check_output_dir(final: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Return ``final`` as an absolute path if a stage may replace it, else raise UnsafeOutput naming why.

    Replacing deletes the old folder, so on top of check_output_place it must be one a stage wrote (it has the
    marker) or an empty one.
    """
    out = check_output_place(final, inputs)
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise UnsafeOutput(f"output folder {final}: is a folder that no finetune stage wrote (no {MARKER} file "
                           f"inside); refusing to delete its contents. Give an empty or new folder, or remove it by "
                           f"hand (outputs of finetune versions before the marker must also be removed once by hand)")
    return out


@contextlib.contextmanager
def atomic_dir(final: str | Path, stage: str, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces ``final`` only if the block succeeds.

    Readers therefore see either the old complete folder or the new complete one, never a half-written one.
    ``final`` must pass check_output_dir (checked before anything is created); the new folder carries the marker
    naming ``stage``, so a later run of a stage may replace it and nothing else. Temporary folders that a killed
    run of the same stage left next to it are removed first (remove_stale_temps); a full disk ends in DiskFull.
    """
    final = check_output_dir(final, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, stage)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        (tmp / TEMP_MARKER).write_text(_writer_id(stage), encoding="utf-8")
        yield tmp
        (tmp / TEMP_MARKER).unlink()
        (tmp / MARKER).write_text(f"{stage}\n", encoding="utf-8")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if no_space_left(exc):
            free = shutil.disk_usage(final.parent).free
            kept = f"the previous {final.name} is unchanged" if final.exists() else "nothing of it was kept"
            raise DiskFull(f"output folder {final}: no space left on the device while writing it ({free / 2**20:.0f} "
                           f"MiB free in {final.parent}); {kept}. Free some space and rerun") from None
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def no_space_left(exc: BaseException) -> bool:
    """ENOSPC, also as safetensors reports it (SafetensorError with the OS error's text)."""
    return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        "No space left on device" in str(exc) or "StorageFull" in str(exc)


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot, /proc), '' when unknown: a pid reused by a
    later process has another start time."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _writer_id(stage: str) -> str:
    pid = os.getpid()
    return f"{stage}\n{socket.gethostname()}\n{pid}\n{_process_start(pid)}\n"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's too)."""
    return _writer_alive(socket.gethostname(), pid, "")


def _writer_alive(host: str, pid: int, start: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process (a shared volume): cannot tell, so never removed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    return not start or _process_start(pid) in ("", start)


def remove_stale_temps(parent: Path, stage: str) -> list[Path]:
    """Remove the temporary (``.<name>.tmp-*``) and replaced (``.<name>.old-<pid>``) folders in ``parent`` that a
    killed run of ``stage`` left: only folders (not links) that carry ``stage``'s writing marker, or its output
    marker and a dead pid in the name, and whose writing process on this machine is gone. Returns them."""
    removed = []
    for cand in parent.glob(".*"):
        if cand.is_symlink() or not cand.is_dir():
            continue
        owner = _stale_owner(cand, stage)
        if owner is None:
            continue
        size = sum(f.stat().st_size for f in cand.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(cand, ignore_errors=True)
        log.info("removed %s (%.1f MiB), left by a %s run that was killed (pid %s)", cand, size / 2**20, stage, owner)
        removed.append(cand)
    return removed


def _stale_owner(cand: Path, stage: str) -> int | None:
    """The dead writer's pid if ``cand`` is a leftover of ``stage``, else None."""
    if ".tmp-" in cand.name and (cand / TEMP_MARKER).is_file():
        lines = (cand / TEMP_MARKER).read_text(encoding="utf-8").split("\n")
        if len(lines) >= 4 and lines[0] == stage and lines[2].isdigit() and \
                not _writer_alive(lines[1], int(lines[2]), lines[3]):
            return int(lines[2])
    head, sep, pid = cand.name.rpartition(".old-")
    if sep and head and pid.isdigit() and (cand / MARKER).is_file() and \
            (cand / MARKER).read_text(encoding="utf-8").strip() == stage and \
            not _writer_alive(socket.gethostname(), int(pid), ""):
        return int(pid)
    return None


ONNX_FP32 = "model.onnx"


ONNX_INT8 = "model.int8.onnx"


METRICS = "metrics.json"
