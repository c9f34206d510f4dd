"""A sampled log of requests and their predictions: JSONL files in a local folder or under an S3 prefix
(``s3://bucket/prefix``), written in batches.

One record per text: ``{"ts", "model", "version", "text" | "text_sha256", "label", "probabilities"}``. With
``log_text: sha256`` only the text's digest is kept, with ``drop`` nothing of it. Headers (the bearer token)
are never part of a record. Each flush writes a new file through a temporary name (an S3 object appears whole
by itself), so a reader never sees a half-written file. S3 credentials and endpoint come from the environment as
everywhere in the project (AWS_* variables, AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL); the location is only
ever logged redacted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finetune.common.redact import redact_text, redact_uri

log = logging.getLogger("finetune")

FLUSH_SECONDS = 60.0  # a quiet server still writes what it sampled within a minute

class RequestLog:
    def __init__(self, folder: str | Path, sample_rate: float, text_mode: str, flush_records: int,
                 rng: random.Random | None = None):
        self.folder = str(folder)
        self.store = S3Folder(self.folder) if self.folder.startswith("s3://") else LocalFolder(Path(self.folder))
        self.sample_rate = sample_rate
        self.text_mode = text_mode
        self.flush_records = flush_records
        self.rng = rng or random.Random()
        self.buffer: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.files = 0
        self.oldest = 0.0
        if self.enabled:
            self.store.prepare()

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

    def flush(self) -> str | None:
        """Write the buffered records to a new file; its location (redacted), or None when there were none or
        the write failed (said in one log line: the records of that batch are lost, the server keeps serving)."""
        with self.lock:
            records, self.buffer = self.buffer, []
            if not records:
                return None
            self.files += 1
            name = f"requests-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{self.files:06d}.jsonl"
        data = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records).encode("utf-8")
        try:
            return self.store.write(name, data)
        except Exception as exc:  # boto3 and the file system raise many types; the server must not stop
            log.error("request log: %d records not written to %s: %s", len(records), self.store.where(name),
                      redact_text(f"{type(exc).__name__}: {exc}"))
            return None


class LocalFolder:
    def __init__(self, folder: Path):
        self.folder = folder

    def prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def where(self, name: str) -> str:
        return str(self.folder / name)

    def write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        tmp = path.with_name("." + name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return str(path)


class S3Folder:
    """``s3://bucket/prefix``: one object per flush, ``<prefix>/requests-....jsonl``."""

    def __init__(self, uri: str):
        parts = urlsplit(uri)
        self.bucket, self.prefix = parts.netloc.rpartition("@")[2], parts.path.strip("/")
        self.shown = redact_uri(uri).rstrip("/")
        self._client = None

    def prepare(self) -> None:
        """Fail at start-up, in one line, when the bucket cannot be reached with the environment's credentials."""
        try:
            self.client().head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise RequestLogError(f"serve.log_folder {self.shown}: cannot reach the bucket "
                                  f"({redact_text(f'{type(exc).__name__}: {exc}')}); S3 credentials and endpoint "
                                  f"come from AWS_* / AWS_ENDPOINT_URL in the environment") from None

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
            self._client = boto3.client("s3", endpoint_url=endpoint, config=Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": 3}))
        return self._client

    def where(self, name: str) -> str:
        return f"{self.shown}/{name}"

    def write(self, name: str, data: bytes) -> str:
        key = f"{self.prefix}/{name}" if self.prefix else name
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/x-ndjson")
        return self.where(name)


class RequestLogError(RuntimeError):
    """The request log's location cannot be written: one line for the user (no credentials in it)."""
