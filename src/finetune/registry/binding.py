"""binding: the figures a registration carries must be those of the model it registers.

evaluate and compress record the sha256 of the model folder they loaded (and compress the sha256 of every file
it wrote); register compares them with the model folder it is given before anything is logged, so an evaluation
or a compress output of another model (a stale folder, a hand-run stage, a mixed-up path) is refused. Pure: files
in, a RegistryError out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.common.digests import FILE_DIGESTS, MODEL_DIGEST, folder_digests, model_digest
from finetune.common.outputs import MARKER, METRICS
from finetune.registry.request import RegistryError


class BindingError(RegistryError):
    """An evaluation or compress output that did not measure the model being registered."""


def check_bound(model: str | Path, what: str, folder: str | Path, metrics: dict[str, Any]) -> None:
    """Refuse ``folder`` (the ``what`` output: evaluation, compress) unless its metrics.json records the sha256
    of ``model``'s folder as it is now."""
    recorded = metrics.get(MODEL_DIGEST)
    if not recorded:
        raise BindingError(f"{what} output {folder} records no model digest ({METRICS} has no '{MODEL_DIGEST}'), so "
                           f"nothing shows it measured {model}; rerun the {what} stage on {model}. Nothing was "
                           f"registered")
    actual = model_digest(model)
    if recorded != actual:
        raise BindingError(f"{what} output {folder} measured the model with sha256 {recorded}, but the model being "
                           f"registered, {model}, has sha256 {actual}: its figures belong to another model; rerun the "
                           f"{what} stage on {model}. Nothing was registered")


def check_compress_files(folder: str | Path, metrics: dict[str, Any], only: tuple[str, ...] = ()) -> None:
    """Refuse a compress output whose files (or the files ``only``) differ from the sha256 compress recorded for
    what it wrote and measured: a swapped ONNX file is not the variant that passed the gate."""
    recorded = metrics.get(FILE_DIGESTS)
    if not isinstance(recorded, dict) or not recorded:
        raise BindingError(f"compress output {folder} records no file digests ({METRICS} has no '{FILE_DIGESTS}'); "
                           f"rerun the compress stage. Nothing was registered")
    found = {k: v for k, v in folder_digests(folder).items() if k not in (METRICS, MARKER)}
    for name in only or sorted(set(recorded) | set(found)):
        if found.get(name) != recorded.get(name):
            now = found.get(name, "missing")
            raise BindingError(f"compress output {folder}: file {name} has sha256 {now}, compress measured "
                               f"{recorded.get(name, 'no such file')}: it is not the file compress measured. "
                               f"Nothing was registered")


def check_inputs(model: str | Path, evaluation: str | Path, metrics: dict[str, Any], compress: str | Path | None,
                 compressed: dict[str, Any] | None) -> None:
    """Everything register is given belongs to ``model``: its evaluation, and its compress output if any."""
    check_bound(model, "evaluate", evaluation, metrics)
    if compress and compressed is not None:
        check_bound(model, "compress", compress, compressed)
        if compressed.get("exported"):
            check_compress_files(compress, compressed)
