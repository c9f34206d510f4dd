"""Peak memory of one step of work in this process: the kernel's resident high-water mark (Linux ``VmHWM``),
reset before the step.

Why RSS and not tracemalloc: tracemalloc sees Python's allocations only, not PyTorch's or ONNX Runtime's own
(its arena: the activations), which are what a variant's inference costs. Why the high-water mark and not RSS
sampled by a thread: a short peak between two samples is missed; the kernel's mark is exact. Elsewhere than on
Linux (no ``/proc/self/clear_refs``) the figure is None, never a guess.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def peak_rss_growth() -> Iterator[dict[str, float | None]]:
    """Yields a dict whose ``mb`` is set on exit: how far the process's resident memory peaked above what it held
    on entry, in MiB (None where the high-water mark cannot be reset)."""
    found: dict[str, float | None] = {"mb": None}
    try:
        _CLEAR.write_text("5")  # 5: reset VmHWM to the current RSS (proc(5), clear_refs)
        start = _status_kb("VmRSS")
    except OSError:
        start = None
    try:
        yield found
    finally:
        peak = _status_kb("VmHWM")
        if start is not None and peak is not None:
            found["mb"] = round(max(peak - start, 0) / 1024, 1)
