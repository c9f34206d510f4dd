"""atomic_dir's leftovers: temporary folders of a killed run are removed by the next run of the same stage, and
nothing else is; a full disk ends in one line and keeps the previous folder."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ENV
from finetune.common.outputs import MARKER, TEMP_MARKER, DiskFull, _writer_id, atomic_dir, remove_stale_temps


def _killed_write(final, stage: str) -> None:
    """A process that dies (SIGKILL) inside atomic_dir after writing 3 MB, as kill -9 does."""
    code = textwrap.dedent(f"""
        import os, signal
        from finetune.common.outputs import atomic_dir
        with atomic_dir({str(final)!r}, {stage!r}) as tmp:
            (tmp / "model.onnx").write_bytes(b"x" * 3_000_000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False,
                          env={**ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == -9


def test_next_run_removes_only_its_own_stages_leftovers_of_dead_writers(tmp_path, caplog):
    out = tmp_path / "out"
    _killed_write(out / "compress", "compress")
    _killed_write(out / "evaluate", "evaluate")
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 2 and all(".tmp-" in n for n in left)
    alive = out / ".compress.tmp-alive"  # a writer that is still running (this process)
    alive.mkdir()
    (alive / TEMP_MARKER).write_text(_writer_id("compress"))
    foreign = out / ".compress.tmp-foreign"  # the name pattern, but no writing marker: not ours
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    old = out / ".compress.old-999999999"  # a replaced folder of a dead pid, marked by compress
    old.mkdir()
    (old / MARKER).write_text("compress\n")
    (out / ".symout.old-999999998").symlink_to(tmp_path)  # a link: never followed, never removed

    with caplog.at_level("INFO", logger="finetune"), atomic_dir(out / "compress", "compress") as tmp:
        (tmp / "model.onnx").write_text("new")
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith(".compress.tmp-") and n not in (alive.name, foreign.name)] == []
    assert old.name not in names and alive.is_dir() and (foreign / "keep.txt").is_file()
    assert any(n.startswith(".evaluate.tmp-") for n in names)  # another stage's leftover: its own next run
    assert (out / ".symout.old-999999998").is_symlink()
    assert "left by a compress run that was killed" in caplog.text and "2.9 MiB" in caplog.text
    assert remove_stale_temps(out, "evaluate")[0].name.startswith(".evaluate.tmp-")


def test_full_disk_ends_in_one_line_and_keeps_the_previous_folder(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final, "train") as tmp:
        (tmp / "w.bin").write_text("good")
    for exc in (OSError(errno.ENOSPC, "No space left on device"),
                RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                             'message: "No space left on device" })')):  # safetensors' SafetensorError text
        message = rf"output folder {final}: no space left on the device while writing it \(\d+ MiB free in {tmp_path}\); "
        with pytest.raises(DiskFull, match=message + "the previous model is unchanged"), \
                atomic_dir(final, "train") as tmp:
            (tmp / "w.bin").write_text("half")
            raise exc
        assert (final / "w.bin").read_text() == "good" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
