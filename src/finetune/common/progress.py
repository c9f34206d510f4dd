"""Progress for long loops: a bar with rate and ETA on a terminal, a plain log line every few seconds elsewhere
(CI logs, `dvc repro` piped to a file, KFP pods), where a redrawn bar would be noise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("finetune")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """``with Progress(total, "evaluate", "texts") as p: ... p.update(n)``.

    ``stream`` (default stderr) decides: a terminal gets a tqdm bar, anything else one log line per ``every``
    seconds and one at the end, each with the count, the rate and the ETA.
    """

    def __init__(self, total: int, desc: str, unit: str, every: float = 10.0, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = 0
        self.note = ""  # e.g. the latest loss, shown after the counts
        self.start = self.last = time.perf_counter()
        stream = stream or sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=stream, dynamic_ncols=True)

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        self.note = note or self.note
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_text = _clock(eta) if eta != float("inf") else "?"
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.1f} {self.unit}/s, "
                f"elapsed {_clock(elapsed)}, ETA {eta_text}" + (f", {self.note}" if self.note else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif time.perf_counter() - self.start >= self.every:  # a long loop also says when it ended
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
