"""The Kubeflow DAG: validate -> tokenize -> train -> evaluate, distill -> compress -> register; optional deploy.
Wiring only.

Parameters: ``params``, the whole resolved config (params.yaml at compile time is its default; `finetune
pipeline submit` sends it again with --set overrides applied), plus the values that exist only per run
(data_uri, data_md5, checkpoint_dir, git_rev). No config value is a parameter of its own, so none can
disagree with ``params``. Cluster settings (GPU, node selector, tolerations, secrets, retries) come from
pipelines/cluster.yaml. Compile with `finetune pipeline compile`.
"""

import ast
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl, kubernetes

from finetune.common.config import Config
from finetune.common.params import as_params, drop_none, load_config
from finetune.common.redact import redact_tree

from components.finetune_components import (compress, deploy, distill, evaluate, register, tokenize, train,
                                            validate, validation_failed)
from components import trainjob_component

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


def build(cfg: Config | None = None, cluster: dict[str, Any] | None = None):
    """Return the pipeline function; ``params`` defaults to ``cfg`` (params.yaml), cluster settings to ``cluster``."""
    cfg = cfg or load_config(ROOT / "params.yaml")
    # redacted: the compiled spec is a file (checked in, uploaded to KFP); a credential in data.path must not be in it
    defaults = redact_tree(as_params(cfg))
    c = cluster or _load(ROOT / "pipelines" / "cluster.yaml")
    retry = c["retries"]

    @dsl.pipeline(name="finetune", description="Fine-tune a pretrained text classifier: validate, tokenize, "
                                               "train (GPU), evaluate, register with gated promotion.")
    def finetune_pipeline(
        data_uri: str = DEFAULT_DATA_URI,
        data_md5: str = "",
        checkpoint_dir: str = "",
        git_rev: str = "",
        deploy_champion: bool = False,
        params: dict = defaults,
    ):
        v = validate(data_uri=data_uri, data_md5=data_md5, params=params)
        v.set_retry(num_retries=retry["validate"], backoff_duration=retry["backoff"])
        _secrets(v, c, "s3")
        with dsl.If(v.outputs["passed"] == True, name="data-valid"):  # noqa: E712 (KFP condition syntax)
            r = training_steps(cfg, c, v, params, data_uri, data_md5, checkpoint_dir, git_rev)
            # optional last step: only a newly promoted champion moves the InferenceService
            with dsl.If(deploy_champion == True, name="deploy-enabled"):  # noqa: E712
                with dsl.If(r.outputs["alias"] == "champion", name="promoted"):
                    _deploy_step(c, r.outputs["registration"])
        with dsl.Else(name="data-invalid"):
            validation_failed(summary=v.outputs["summary"]).set_caching_options(False)
        _resources(v, c["resources"]["cpu"], c["resources"]["memory"])

    return finetune_pipeline


def training_steps(cfg: Config, c: dict[str, Any], v, params, data_uri, data_md5, checkpoint_dir, git_rev):
    """tokenize -> train -> evaluate, distill -> compress -> register on the splits of the validate task ``v``, with their
    secrets, resources, retries and pod labels; returns the register task. The monitoring loop's retrain branch
    (pipelines/monitor_pipeline.py) wires the same steps with this."""
    retry = c["retries"]
    t = tokenize(splits=v.outputs["splits"], params=params)
    m = _train_step(cfg, c, t.outputs["tokens"], params, checkpoint_dir)
    e = evaluate(model=m.outputs["model"], tokens=t.outputs["tokens"], params=params)
    s = distill(model=m.outputs["model"], tokens=t.outputs["tokens"], params=params)  # skips itself when disabled
    s.after(e)  # the order: a student only of a model that was evaluated
    z = compress(model=m.outputs["model"], tokens=t.outputs["tokens"], params=params, student=s.outputs["student"])
    r = register(model=m.outputs["model"], evaluation=e.outputs["evaluation"], splits=v.outputs["splits"],
                 train_logs=m.outputs["train_logs"], tokens=t.outputs["tokens"],
                 compressed=z.outputs["compressed"], params=params,
                 data_uri=data_uri, data_md5=data_md5, git_rev=git_rev,
                 run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
    r.set_caching_options(False)  # a side effect on the registry: never skipped as "cached"
    r.set_retry(num_retries=retry["register"], backoff_duration=retry["backoff"])
    _secrets(r, c, "s3", "mlflow")
    for task in (t, e, r, z, s):
        _resources(task, c["resources"]["cpu"], c["resources"]["memory"])
    for task in (v, t, m, e, r, z, s):  # k8s/ network policies admit only labelled pods to MLflow and S3
        kubernetes.add_pod_label(task, c["pod_label"]["key"], c["pod_label"]["value"])
    return r


def _train_step(cfg: Config, c: dict[str, Any], tokens, params, checkpoint_dir):
    """train on a GPU node of the cluster, or (launch.launcher: trainjob) a step that launches a TrainJob and
    waits for it: then the TrainJob's nodes get the GPUs."""
    trainjob = cfg.launch.launcher == "trainjob"
    m = (trainjob_component.train if trainjob else train)(
        tokens=tokens, params=params, checkpoint_dir=checkpoint_dir,
        **(trainjob_component.launch_args(drop_none(c)) if trainjob else {}))
    if trainjob:
        trainjob_component.mount_shared_volume(m, c)
        _resources(m, c["resources"]["cpu"], c["resources"]["memory"])
    else:
        g = c["gpu"]
        m.set_accelerator_type(g["accelerator"]).set_accelerator_limit(g["count"])
        _resources(m, c["resources"]["train_cpu"], c["resources"]["train_memory"])
        for key, value in (g.get("node_selector") or {}).items():
            kubernetes.add_node_selector(m, label_key=key, label_value=str(value))
        for tol in g.get("tolerations") or []:
            kubernetes.add_toleration(m, **tol)
    return m


def _deploy_step(c: dict[str, Any], registration) -> None:
    """Point the InferenceService at the newly promoted champion."""
    s = c["serving"]
    d = deploy(registration=registration, inference_service=s["inference_service"],
               namespace=s["namespace"], artifacts_destination=s["artifacts_destination"])
    d.set_caching_options(False)
    _secrets(d, c, "mlflow")
    _resources(d, c["resources"]["cpu"], c["resources"]["memory"])
    kubernetes.add_pod_label(d, c["pod_label"]["key"], c["pod_label"]["value"])


def compile_spec(out: str | Path = SPEC, cfg: Config | None = None, cluster: dict[str, Any] | None = None) -> Path:
    compiler.Compiler().compile(build(cfg, cluster), package_path=str(out))
    path = Path(out)
    path.write_text(_stable_header(path.read_text(encoding="utf-8")), encoding="utf-8")
    return path


def _stable_header(text: str) -> str:
    """KFP prints dict defaults in the header comment in protobuf map order, which varies run to run; sort them
    so that compiling the same inputs writes the same bytes (the checked-in spec stays unmodified)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        head, sep, rest = line.partition(": dict [Default: ")
        if sep and rest.endswith("]"):
            lines[i] = f"{head}{sep}{_sorted(ast.literal_eval(rest[:-1]))!r}]"
    return "\n".join(lines)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return [_sorted(v) for v in value] if isinstance(value, list) else value
