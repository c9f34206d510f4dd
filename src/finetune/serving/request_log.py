"""A sampled log of requests and their predictions: JSONL files in a local folder, written in batches.

One record per text: ``{"ts", "model", "version", "text" | "text_sha256", "label", "probabilities"}``. With
``log_text: sha256`` only the text's digest is kept, with ``drop`` nothing of it. Headers (the bearer token)
are never part of a record. Each flush writes a new file through a temporary name, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

FLUSH_SECONDS = 60.0  # a quiet server still writes what it sampled within a minute

class RequestLog:
    def __init__(self, folder: str | Path, sample_rate: float, text_mode: str, flush_records: int,
                 rng: random.Random | None = None):
        self.folder = Path(folder)
        self.sample_rate = sample_rate
        self.text_mode = text_mode
        self.flush_records = flush_records
        self.rng = rng or random.Random()
        self.buffer: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.files = 0
        self.oldest = 0.0
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.sample_rate > 0

    def sampled(self) -> bool:
        """Whether this request goes to the log (decided per request: all its texts or none)."""
        return self.enabled and self.rng.random() < self.sample_rate

    def add(self, model: str, version: str, texts: list[str], predictions: list[dict[str, Any]]) -> bool:
        """Buffer the records of one request; True when the buffer is due to be flushed."""
        now = time.time()
        records = [{"ts": now, "model": model, "version": version, **self._text(t), **p}
                   for t, p in zip(texts, predictions)]
        with self.lock:
            self.oldest = self.oldest if self.buffer else now
            self.buffer.extend(records)
            return len(self.buffer) >= self.flush_records or now - self.oldest >= FLUSH_SECONDS

    def _text(self, text: str) -> dict[str, str]:
        if self.text_mode == "keep":
            return {"text": text}
        if self.text_mode == "sha256":
            return {"text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        return {}

    def flush(self) -> Path | None:
        """Write the buffered records to a new file; None when there were none."""
        with self.lock:
            records, self.buffer = self.buffer, []
            if not records:
                return None
            self.files += 1
            name = f"requests-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{self.files:06d}.jsonl"
        path = self.folder / name
        tmp = path.with_name("." + name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        os.replace(tmp, path)
        return path
