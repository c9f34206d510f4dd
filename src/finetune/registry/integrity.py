"""integrity: sha256 of every file of a logged model, and the check of a downloaded copy against them.

The digests are recorded in the registry (model-version tags), not in the artifact store: whoever can rewrite
the weights in the store could rewrite a manifest stored next to them too. Pure: folders and dicts in and out.
"""

from __future__ import annotations

from pathlib import Path

from finetune.common.digests import folder_digests  # one digest rule for the stages and the registry

TAG_PREFIX = "sha256/"  # one model-version tag per file: sha256/<path inside the model> = hex digest


class IntegrityError(RuntimeError):
    """A downloaded model differs from what was registered: missing, extra or changed file."""


def as_tags(digests: dict[str, str]) -> dict[str, str]:
    return {TAG_PREFIX + path: digest for path, digest in digests.items()}


def from_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k[len(TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(TAG_PREFIX)}


def verify(folder: str | Path, expected: dict[str, str], what: str) -> None:
    """Refuse ``folder`` unless its files are exactly ``expected`` (same names, same sha256)."""
    if not expected:
        raise IntegrityError(f"{what}: the registry records no file digests for it (registered before digests "
                             f"were recorded); refusing to load an unverifiable model")
    found = folder_digests(folder)
    for path in sorted(set(expected) | set(found)):
        if path not in found:
            raise IntegrityError(f"{what}: file {path} is missing from the artifact store; refusing to load")
        if path not in expected:
            raise IntegrityError(f"{what}: file {path} is in the artifact store but not in the registry's digests; "
                                 f"refusing to load")
        if found[path] != expected[path]:
            raise IntegrityError(f"{what}: file {path} differs from the sha256 recorded in the registry; "
                                 f"refusing to load a modified model")
