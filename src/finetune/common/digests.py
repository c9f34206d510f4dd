"""sha256 of files and model folders: what evaluate and compress record about the model they measured, what
register checks those records against, and what the registry stores per file (registry.integrity)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

MODEL_DIGEST = "model_sha256"  # key in evaluate's and compress's metrics.json: the model folder they measured


FILE_DIGESTS = "files_sha256"  # key in compress's metrics.json: {file it wrote: sha256}


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def folder_digests(folder: str | Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``folder``."""
    root = Path(folder)
    files = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(root.rglob("*")) if f.is_file())
    return {Path(p).relative_to(root).as_posix(): d for p, d in _hash_files(files)}


@functools.lru_cache(maxsize=8)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, str], ...]:
    # Memoised on (path, mtime, size): a registration hashes ~100 MB of weights more than once.
    return tuple((path, file_sha256(path)) for path, _, _ in files)


def model_digest(folder: str | Path) -> str:
    """One sha256 for a whole model folder: of its sorted ``path -> sha256`` list (weights, config, tokenizer)."""
    return hashlib.sha256(json.dumps(folder_digests(folder), sort_keys=True).encode()).hexdigest()
