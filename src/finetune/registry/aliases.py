"""The variant models' aliases, derived from the fp32 model's: ``<name>-int8@champion`` is the variant of
``<name>@champion`` (none when that version has no variant), likewise ``@challenger``; the same for every model of
``VARIANT_SUFFIXES`` (``<name>-student``: the student chosen to serve a version).

Derived, not decided: every registration recomputes them under the alias lease, right after (and in the same
leased step as) its fp32 alias move, and again once its variant is registered. So a registration paused or
killed between the two moves cannot leave the int8 champion on another version's variant for longer than
until the next registration of this model name, whatever that one decides.
"""

from __future__ import annotations

import logging

from finetune.registry.request import CHALLENGER, CHAMPION, INT8_SUFFIX, VARIANT_SUFFIXES
from finetune.registry.store import current_alias

log = logging.getLogger(__name__)


def variant_of(client, name: str, fp32_version: str, suffix: str = INT8_SUFFIX) -> str | None:
    """The complete version of ``name+suffix`` whose fp32 parent is ``name`` v``fp32_version``, if any (the newest)."""
    found = [int(mv.version) for mv in client.search_model_versions(f"name = '{name}{suffix}'")
             if (mv.tags or {}).get("fp32_model") == f"{name}/{fp32_version}"
             and (mv.tags or {}).get("complete") == "true"]
    return str(max(found)) if found else None


def sync_variant_aliases(client, name: str, lease) -> dict[str, dict[str, str | None]]:
    """Point every variant model's ``@champion``/``@challenger`` (``<name>-int8``, ``<name>-student``, ...) at the
    variants of ``<name>@champion``/``@challenger``, or remove them; ``lease`` (held) is checked before each move.
    Returns what changed for the int8 model: alias -> {from, to} (the others' moves are logged)."""
    return {suffix: _sync_one(client, name, suffix, lease) for suffix in VARIANT_SUFFIXES}[INT8_SUFFIX]


def _sync_one(client, name: str, suffix: str, lease) -> dict[str, dict[str, str | None]]:
    int8 = name + suffix
    if not client.search_registered_models(f"name = '{int8}'"):
        return {}
    changes = {}
    for alias in (CHAMPION, CHALLENGER):
        parent = current_alias(client, name, alias)
        want = variant_of(client, name, str(parent.version), suffix) if parent is not None else None
        now = current_alias(client, int8, alias)
        have = str(now.version) if now is not None else None
        if want == have:
            continue
        lease.check()
        if want is None:
            client.delete_registered_model_alias(int8, alias)
        else:
            client.set_registered_model_alias(int8, alias, want)
        changes[alias] = {"from": have, "to": want}
        log.info("%s@%s: %s -> %s (follows %s@%s)", int8, alias, have or "none", want or "none", name, alias)
    return changes
