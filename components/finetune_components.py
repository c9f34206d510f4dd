"""KFP v2 components, one per stage verb. Each maps Input/Output artifact paths and parameters onto
``finetune.stages.run_<verb>``, exactly what the `finetune` CLI and dvc.yaml call. No stage logic here.

Lightweight components whose bodies import the installed package: locally (kfp.local.SubprocessRunner)
the import resolves in the project's venv, on a cluster in the image named in components/image.txt.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

IMAGE = (Path(__file__).with_name("image.txt")).read_text().strip()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(data_uri: str, data_md5: str, params: dict, splits: Output[Dataset], report: Output[Artifact]
             ) -> NamedTuple("ValidateOutputs", passed=bool, summary=str):
    """Check the raw data; on failure return passed=False (the report artifact says why) and write no splits."""
    from finetune.common.params import config_from_dict
    from finetune.stages import StageFailed
    from finetune.stages.validate import run_validate

    try:
        run_validate(config_from_dict(params), data_uri, splits.path, report.path, expected_md5=data_md5 or None)
    except StageFailed as exc:
        return (False, str(exc))
    return (True, "")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validation_failed(summary: str):
    """Ends the run as failed after validate refused the data (its report stays as an artifact)."""
    raise SystemExit(f"data validation failed; see the validate step's report artifact\n{summary}")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tokenize(splits: Input[Dataset], params: dict, tokens: Output[Dataset]):
    from finetune.common.params import config_from_dict
    from finetune.stages.tokenize import run_tokenize

    run_tokenize(config_from_dict(params), splits.path, tokens.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(tokens: Input[Dataset], params: dict, checkpoint_dir: str, model: Output[Model],
          train_logs: Output[Artifact]):
    from finetune.common.params import config_from_dict
    from finetune.stages.train import run_train

    run_train(config_from_dict(params), tokens.path, model.path, train_logs.path, checkpoint_dir or None)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], tokens: Input[Dataset], params: dict, evaluation: Output[Artifact],
             metrics: Output[Metrics], confusion: Output[ClassificationMetrics]):
    from finetune.common.params import config_from_dict
    from finetune.stages.evaluate import run_evaluate, scalar_scores

    result = run_evaluate(config_from_dict(params), model.path, tokens.path, evaluation.path)
    for key, value in scalar_scores(result).items():  # KFP UI: the task's scores + the confusion matrix
        metrics.log_metric(key, value)
    if "confusion_matrix" in result:
        confusion.log_confusion_matrix(result["labels"], result["confusion_matrix"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], evaluation: Input[Artifact], splits: Input[Dataset], train_logs: Input[Artifact],
             tokens: Input[Dataset], compressed: Input[Model], params: dict, data_uri: str, data_md5: str,
             git_rev: str, run_name: str, registration: Output[Artifact]) -> NamedTuple("RegisterOutputs", version=str, alias=str):
    """Needs MLFLOW_TRACKING_URI (and S3 credentials for the artifact store) in the environment.
    Lineage has the keys of the local path (lineage.collect); what a pod cannot know (the working tree,
    data.dvc) is null. ``compressed``: the compress output; its int8 variant is registered when it passed."""
    from finetune.common.params import config_from_dict
    from finetune.common import lineage, tracking
    from finetune.stages.register import run_register

    trail = lineage.collect(data_uri, data_md5=data_md5 or None, git_commit=git_rev or None, kfp_run=run_name)
    reg = run_register(config_from_dict(params), model.path, evaluation.path, splits.path, train_logs.path,
                       registration.path, trail, *tracking.configure(require_env=True), tokens=tokens.path,
                       compress=compressed.path)
    return (reg["version"], reg["alias"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(model: Input[Model], tokens: Input[Dataset], params: dict, student: Output[Model]):
    """The student of the trained model; distill.enabled false (the default): only distill.json saying so, in
    seconds (as the dvc stage), and compress measures the teacher's variants alone."""
    from finetune.common.params import config_from_dict
    from finetune.stages.distill import run_distill

    run_distill(config_from_dict(params), model.path, tokens.path, student.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compress(model: Input[Model], tokens: Input[Dataset], params: dict, student: Input[Model],
             compressed: Output[Model], metrics: Output[Metrics]):
    """ONNX + int8 variants (and the student's); a refused or unexportable variant is reported in metrics, never a
    failed run; metrics.json ``serving``: the variant chosen to serve."""
    from finetune.common.params import config_from_dict
    from finetune.stages.compress import run_compress

    result = run_compress(config_from_dict(params), model.path, tokens.path, compressed.path, [student.path])
    metrics.log_metric("int8_passed", float(result["int8_passed"]))
    for key, value in result["variants"].get("onnx_int8", {}).items():  # KFP UI: the gated variant's figures
        metrics.log_metric(f"int8_{key}", value)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(registration: Input[Artifact], inference_service: str, namespace: str, artifacts_destination: str):
    """Needs MLFLOW_TRACKING_URI and a service account that may patch the InferenceService."""
    from finetune.cluster.deploy import run_deploy

    run_deploy(registration.path, inference_service, namespace, artifacts_destination)
