"""The Kubeflow DAG: validate -> tokenize -> train -> evaluate -> register (+ compress; optional deploy). Wiring only.

Defaults of the pipeline parameters come from params.yaml at compile time; cluster settings (GPU, node
selector, tolerations, secrets, retries) from pipelines/cluster.yaml. Compile with `finetune pipeline compile`.
"""

from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl, kubernetes

from finetune.config import drop_none

from components.finetune_components import (compress, deploy, evaluate, register, tokenize, train, validate,
                                            validation_failed)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "pipelines" / "finetune_pipeline.yaml"
DEFAULT_DATA_URI = "s3://finetune-data/reviews.csv"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _secrets(task, cluster: dict[str, Any], *which: str) -> None:
    for name in which:
        s = cluster["secrets"][name]
        kubernetes.use_secret_as_env(task, secret_name=s["name"], secret_key_to_env={k: k for k in s["env"]})


def _resources(task, cpu: str, memory: str) -> None:
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)


def build(params: dict[str, Any] | None = None, cluster: dict[str, Any] | None = None):
    """Return the pipeline function, its defaults taken from ``params`` (params.yaml) and ``cluster``."""
    p = params or _load(ROOT / "params.yaml")
    c = cluster or _load(ROOT / "pipelines" / "cluster.yaml")
    tr, reg = p["train"], p["register"]
    retry = c["retries"]

    @dsl.pipeline(name="finetune", description="Fine-tune a pretrained text classifier: validate, tokenize, "
                                               "train (GPU), evaluate, register with gated promotion.")
    def finetune_pipeline(
        data_uri: str = DEFAULT_DATA_URI,
        data_md5: str = "",
        base_model: str = p["model"]["base"],
        epochs: float = float(tr["epochs"]),
        max_steps: int = int(tr["max_steps"] or 0),
        batch_size: int = int(tr["batch_size"]),
        learning_rate: float = float(tr["learning_rate"]),
        model_name: str = reg["model_name"],
        gate_metric: str = reg["metric"],
        min_improvement: float = float(reg["min_improvement"]),
        floor: float = float(reg["floor"]),
        checkpoint_dir: str = "",
        git_rev: str = "",
        deploy_champion: bool = False,
        params: dict = drop_none(p),
    ):
        v = validate(data_uri=data_uri, data_md5=data_md5, params=params)
        v.set_retry(num_retries=retry["validate"], backoff_duration=retry["backoff"])
        _secrets(v, c, "s3")
        with dsl.If(v.outputs["passed"] == True, name="data-valid"):  # noqa: E712 (KFP condition syntax)
            t = tokenize(splits=v.outputs["splits"], params=params, base_model=base_model)
            m = train(tokens=t.outputs["tokens"], params=params, base_model=base_model, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate,
                      checkpoint_dir=checkpoint_dir)
            g = c["gpu"]
            m.set_accelerator_type(g["accelerator"]).set_accelerator_limit(g["count"])
            _resources(m, c["resources"]["train_cpu"], c["resources"]["train_memory"])
            for key, value in (g.get("node_selector") or {}).items():
                kubernetes.add_node_selector(m, label_key=key, label_value=str(value))
            for tol in g.get("tolerations") or []:
                kubernetes.add_toleration(m, **tol)
            e = evaluate(model=m.outputs["model"], tokens=t.outputs["tokens"], params=params)
            r = register(model=m.outputs["model"], evaluation=e.outputs["evaluation"], splits=v.outputs["splits"],
                         train_logs=m.outputs["train_logs"], params=params, model_name=model_name,
                         gate_metric=gate_metric, min_improvement=min_improvement, floor=floor,
                         data_uri=data_uri, git_rev=git_rev, run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
            r.set_caching_options(False)  # a side effect on the registry: never skipped as "cached"
            r.set_retry(num_retries=retry["register"], backoff_duration=retry["backoff"])
            _secrets(r, c, "s3", "mlflow")
            z = compress(model=m.outputs["model"], tokens=t.outputs["tokens"], params=params)
            for task in (t, e, r, z):
                _resources(task, c["resources"]["cpu"], c["resources"]["memory"])
            for task in (v, t, m, e, r, z):  # k8s/ network policies admit only labelled pods to MLflow and S3
                kubernetes.add_pod_label(task, c["pod_label"]["key"], c["pod_label"]["value"])
            # optional last step: only a newly promoted champion moves the InferenceService
            with dsl.If(deploy_champion == True, name="deploy-enabled"):  # noqa: E712
                with dsl.If(r.outputs["alias"] == "champion", name="promoted"):
                    s = c["serving"]
                    d = deploy(registration=r.outputs["registration"], inference_service=s["inference_service"],
                               namespace=s["namespace"], artifacts_destination=s["artifacts_destination"])
                    d.set_caching_options(False)
                    _secrets(d, c, "mlflow")
                    _resources(d, c["resources"]["cpu"], c["resources"]["memory"])
                    kubernetes.add_pod_label(d, c["pod_label"]["key"], c["pod_label"]["value"])
        with dsl.Else(name="data-invalid"):
            validation_failed(summary=v.outputs["summary"]).set_caching_options(False)
        _resources(v, c["resources"]["cpu"], c["resources"]["memory"])

    return finetune_pipeline


def compile_spec(out: str | Path = SPEC, params: dict[str, Any] | None = None,
                 cluster: dict[str, Any] | None = None) -> Path:
    compiler.Compiler().compile(build(params, cluster), package_path=str(out))
    return Path(out)
