"""compare: two registered models (challenger vs champion by default) or two MLflow runs side by side:
primary metrics, macro-F1, per-class F1, and the params (and lineage) that differ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PRIMARY = ("accuracy", "macro_f1", "loss", "ece", "n")
LOWER_IS_BETTER = {"loss", "ece"}


class CompareError(RuntimeError):
    pass


@dataclass
class Side:
    title: str  # "champion v3", or a run id
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Comparison:
    base: Side
    other: Side
    metrics: list[tuple[str, float | None, float | None]]
    per_class_f1: list[tuple[str, float | None, float | None]]
    differing: list[tuple[str, str | None, str | None]]


def compare(base: Side, other: Side) -> Comparison:
    """``other`` measured against ``base``. Per-class F1 comes from the ``f1_<label>`` metrics the register
    stage logs; lineage tags (``lineage.*``) that differ are listed with the params (weights' hashes are not)."""
    def pair(key):
        return key, base.metrics.get(key), other.metrics.get(key)

    metrics = [pair(k) for k in PRIMARY if k in base.metrics or k in other.metrics]
    classes = sorted({k[3:] for k in (*base.metrics, *other.metrics) if k.startswith("f1_")})
    per_class = [(lab, *pair(f"f1_{lab}")[1:]) for lab in classes]
    a = {**base.params, **{k: v for k, v in base.tags.items() if k.startswith("lineage.")}}
    b = {**other.params, **{k: v for k, v in other.tags.items() if k.startswith("lineage.")}}
    # the weights' hashes always differ between two models: not worth a row
    differing = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k) and not k.startswith("weights_sha256")]
    return Comparison(base, other, metrics, per_class, differing)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}" if v.is_integer() and abs(v) >= 10 else f"{v:.4f}"
    return str(v).replace("|", "\\|")


def _change(key: str, a: float | None, b: float | None) -> str:
    if a is None or b is None or key == "n":
        return ""
    d = b - a
    if abs(d) < 5e-5:
        return "="
    better = d < 0 if key in LOWER_IS_BETTER else d > 0
    return f"{d:+.4f} ({'better' if better else 'worse'})"


def format_comparison(c: Comparison) -> str:
    """Markdown tables (they read fine in a terminal too)."""
    head = f"| | {c.base.title} | {c.other.title} | change |\n|---|---:|---:|---|"
    lines = [f"{c.other.title} (run {c.other.run_id}) against {c.base.title} (run {c.base.run_id})", "", head]
    lines += [f"| {k} | {_fmt(a)} | {_fmt(b)} | {_change(k, a, b)} |" for k, a, b in c.metrics]
    if c.per_class_f1:
        lines += ["", head.replace("| |", "| F1 per class |", 1)]
        lines += [f"| {lab} | {_fmt(a)} | {_fmt(b)} | {_change('f1', a, b)} |" for lab, a, b in c.per_class_f1]
    lines += [""]
    if c.differing:
        lines += [f"| param | {c.base.title} | {c.other.title} |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(a)} | {_fmt(b)} |" for k, a, b in c.differing]
    else:
        lines.append("Params and lineage: identical.")
    return "\n".join(lines) + "\n"


# ---- reading the sides from MLflow (the edge) ----

def _side(client, title: str, run_id: str) -> Side:
    run = client.get_run(run_id)
    return Side(title, run_id, dict(run.data.metrics), dict(run.data.params), dict(run.data.tags))


def sides_from_registry(client, model_name: str, base_alias: str = "champion",
                        other_alias: str = "challenger") -> tuple[Side, Side]:
    from mlflow.exceptions import MlflowException

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
    from mlflow.exceptions import MlflowException

    try:
        return _side(client, f"run {base_run[:8]}", base_run), _side(client, f"run {other_run[:8]}", other_run)
    except MlflowException as exc:
        raise CompareError(f"cannot read the runs: {exc.message}") from exc
