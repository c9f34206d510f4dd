"""Reading two registered versions or two runs from MLflow for `finetune compare`."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


class CompareError(RuntimeError):
    pass


@dataclass
class Side:
    title: str  # "champion v3", or a run id
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)




def _side(client, title: str, run_id: str) -> Side:
    run = client.get_run(run_id)
    return Side(title, run_id, dict(run.data.metrics), dict(run.data.params), dict(run.data.tags))


def sides_from_registry(client, model_name: str, base_alias: str = "champion",
                        other_alias: str = "challenger") -> tuple[Side, Side]:

    out = []
    for alias in (base_alias, other_alias):
        try:
            mv = client.get_model_version_by_alias(model_name, alias)
        except MlflowException as exc:
            raise CompareError(_missing(model_name, alias, exc)) from exc
        out.append(_side(client, f"{alias} v{mv.version}", mv.run_id))
    return out[0], out[1]


def _missing(model_name: str, alias: str, exc) -> str:
    """Say what is missing and what to do; a registry that fails otherwise is not called empty."""
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
        return (f"no registered model {model_name} in this registry: run the pipeline first (`make run` or "
                f"`dvc repro`), from the project root or with MLFLOW_TRACKING_URI set to its store")
    if exc.error_code != "INVALID_PARAMETER_VALUE" or "not found" not in exc.message:
        return f"cannot read {model_name}@{alias} from the registry: {exc.message}"
    if alias == "challenger":
        return (f"{model_name} has no version with alias @challenger yet: a registered version gets it when it does "
                f"not beat the champion, and so far every version was promoted. Register another model (e.g. "
                f"`dvc exp run -S train.epochs=1`), or compare two runs now with `finetune compare --runs BASE OTHER`")
    if alias == "champion":
        return f"{model_name} has no version with alias @champion: no version passed the gate yet (see register.floor)"
    return f"{model_name} has no version with alias @{alias}: {exc.message}"


def sides_from_runs(client, base_run: str, other_run: str) -> tuple[Side, Side]:

    try:
        return _side(client, f"run {base_run[:8]}", base_run), _side(client, f"run {other_run[:8]}", other_run)
    except MlflowException as exc:
        raise CompareError(f"cannot read the runs: {exc.message}") from exc


def read_sides(tracking_uri: str, model_name: str, aliases: tuple[str, str] = ("champion", "challenger"),
               runs: tuple[str, str] | None = None) -> tuple[Side, Side]:
    """The two sides `finetune compare` shows: two runs when ``runs`` is given, else two aliases of the model."""
    client = MlflowClient(tracking_uri)
    if runs:
        return sides_from_runs(client, *runs)
    return sides_from_registry(client, model_name, *aliases)
