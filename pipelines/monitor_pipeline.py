"""The loop: monitor a data URI against the champion and, when it drifted and is labelled (or force_retrain),
run the training pipeline (pipelines/finetune_pipeline.py) on that data version; its register step's gate then
decides as always. Wiring only. Compile with `python -m pipelines.monitor_pipeline` (writes
pipelines/monitor_pipeline.yaml); schedule it as a KFP recurring run (docs/monitoring.md)."""

from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from finetune.common.config import Config
from finetune.common.params import as_params, load_config
from finetune.common.redact import redact_tree

from components.finetune_components import validate, validation_failed
from components.monitor_component import monitor, no_retrain
from pipelines import finetune_pipeline

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "pipelines" / "monitor_pipeline.yaml"


def build_monitor(cfg: Config | None = None, cluster: dict[str, Any] | None = None):
    cfg = cfg or load_config(ROOT / "params.yaml")
    defaults = redact_tree(as_params(cfg))
    c = cluster or finetune_pipeline._load(ROOT / "pipelines" / "cluster.yaml")

    @dsl.pipeline(name="finetune-monitor", description="Monitor a data version against the champion; retrain on "
                                                       "it when it drifted and is labelled.")
    def monitor_pipeline(data_uri: str, model_uri: str = "", force_retrain: bool = False, git_rev: str = "",
                         params: dict = defaults):
        m = monitor(data_uri=data_uri, model_uri=model_uri, params=params, force_retrain=force_retrain)
        m.set_caching_options(False)  # every scheduled check looks at the registry as it is now
        finetune_pipeline._secrets(m, c, "s3", "mlflow")
        finetune_pipeline._resources(m, c["resources"]["cpu"], c["resources"]["memory"])
        kubernetes.add_pod_label(m, c["pod_label"]["key"], c["pod_label"]["value"])
        with dsl.If(m.outputs["retrain"] == True, name="retrain"):  # noqa: E712 (KFP condition syntax)
            _retrain(cfg, c, data_uri, git_rev, params)
        # an If with its Else: KFP's local runner resolves a task output in an If/Else's condition, not in a bare If's
        with dsl.Else(name="no-retrain"):
            no_retrain(drift=m.outputs["drift"], labelled=m.outputs["labelled"]).set_caching_options(False)

    return monitor_pipeline


def _retrain(cfg: Config, c: dict[str, Any], data_uri, git_rev, params) -> None:
    """The training pipeline's steps on ``data_uri``, wired by the training pipeline's own training_steps. Inline,
    not the pipeline nested as a task: KFP's local runner skips a nested pipeline (checked with kfp 2.17), and the
    loop must run there in the tests."""
    v = validate(data_uri=data_uri, data_md5="", params=params)
    v.set_retry(num_retries=c["retries"]["validate"], backoff_duration=c["retries"]["backoff"])
    finetune_pipeline._secrets(v, c, "s3")
    finetune_pipeline._resources(v, c["resources"]["cpu"], c["resources"]["memory"])
    with dsl.If(v.outputs["passed"] == True, name="new-data-valid"):  # noqa: E712
        finetune_pipeline.training_steps(cfg, c, v, params, data_uri, "", "", git_rev)
    with dsl.Else(name="new-data-invalid"):
        validation_failed(summary=v.outputs["summary"]).set_caching_options(False)


def compile_monitor_spec(out: str | Path = SPEC, cfg: Config | None = None,
                         cluster: dict[str, Any] | None = None) -> Path:
    compiler.Compiler().compile(build_monitor(cfg, cluster), package_path=str(out))
    path = Path(out)
    path.write_text(finetune_pipeline._stable_header(path.read_text(encoding="utf-8")), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(compile_monitor_spec())
