"""params.yaml ``task:``, the one top-level value of the config: which task family every stage runs
(src/finetune/tasks/, docs/tasks.md)."""

from __future__ import annotations

from typing import Any

from finetune.common.coercion import ConfigError

TASK_NAMES = ("single_label", "multi_label", "token")  # the modules of finetune.tasks (tasks/__init__.py)
TASK_HELP = "single_label (one class per text), multi_label (any number of labels per text) or token (NER)"


def check_task(name: str) -> None:
    if name not in TASK_NAMES:
        raise ConfigError(f"task = {name!r}: must be one of {', '.join(TASK_NAMES)}")


def dotted_items(section: str, values: Any) -> list[tuple[str, Any]]:
    """A config section's (dotted key, value) pairs; a top-level value (``task``) under its own name."""
    return [(f"{section}.{k}", v) for k, v in values.items()] if isinstance(values, dict) else [(section, values)]
