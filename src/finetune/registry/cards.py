"""The model card and run report attached to a registered version."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from finetune.common.redact import redact_text
from finetune.registry.request import RegistrationRequest, RegistryError, RegistryUnavailable
from finetune.registry.store import with_retries


# model_versions.description is VARCHAR(5000) in MLflow's SQL schema: PostgreSQL and MySQL refuse a longer one
# (SQLite does not check); the whole card is always the run's model_card.md artifact
DESCRIPTION_LIMIT = 5000


def card_description(card: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as a version description: whole when it fits, else cut at the last line that fits, with a note
    pointing at the run's model_card.md (which holds it whole)."""
    if len(card) <= limit:
        return card
    note = "\n\n*(cut at the registry's 5,000-character description limit: the whole card is the run's model_card.md)*\n"
    head = card[:limit - len(note)]
    return head[:head.rfind("\n") + 1 or len(head)].rstrip() + note


def update_model_card(req: RegistrationRequest, version: str, run_id: str, card: str) -> None:
    """Replace the card of a registered version (its description and the run's model_card.md): the card written
    at registration cannot know yet what became of the int8 variant."""

    def once() -> None:
        try:
            client = MlflowClient(req.tracking_uri)
            client.update_model_version(req.cfg.model_name, version, description=card_description(card))
            client.log_text(run_id, card, "model_card.md")
        except Exception as exc:
            raise RegistryUnavailable(f"updating the model card of {req.cfg.model_name} v{version} failed: {exc}") \
                from exc

    with_retries(req.cfg, req.tracking_uri, once)


def upload_report(tracking_uri: str, run_id: str, folder: str | Path) -> None:
    """The run report and its plots into the run under ``report/``."""
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri).log_artifacts(run_id, str(folder), "report")
    except Exception as exc:  # the version is registered; a rerun (idempotent) logs the report again
        raise RegistryError(redact_text(f"logging the run report to MLflow run {run_id} failed: {exc}")) from None
