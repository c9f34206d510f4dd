"""Stage output folders: written whole or not at all (atomic_dir), never over what a stage does
not own, and the names of the files that later stages read from them."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

MARKER = ".finetune-output"  # written into every folder atomic_dir creates: proof that a stage owns it


class UnsafeOutput(Exception):
    """An output folder that a stage must not replace: it would delete files the stage did not write."""


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
    naming ``stage``, so a later run of a stage may replace it and nothing else.
    """
    final = check_output_dir(final, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(f"{stage}\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


ONNX_FP32 = "model.onnx"


ONNX_INT8 = "model.int8.onnx"


METRICS = "metrics.json"
