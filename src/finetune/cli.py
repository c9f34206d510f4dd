"""`finetune <verb>`: parse the arguments, load params.yaml, call the verb's ``run_<verb>``.

dvc.yaml calls these commands; the Kubeflow components call the same ``run_<verb>`` functions. Argument parsing
and dispatch only: one small parser builder and one small call per verb.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Callable

import yaml

from finetune.common import lineage, tracking
from finetune.common.coercion import ConfigError
from finetune.common.config import Config
from finetune.common.logs import setup_logging
from finetune.common.params import apply_overrides, load_config, read_params

log = logging.getLogger("finetune")


def _version() -> str:
    try:
        return version("finetune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# ---- parsing: one builder per verb ----

def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params value (repeatable), e.g. --set train.epochs=1")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    common.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    return common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained text classifiers end to end.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    common = _common_options()
    for add in (_add_validate, _add_tokenize, _add_train, _add_evaluate, _add_distill, _add_compress, _add_register,
                _add_tune, _add_predict, _add_compare, _add_materialize, _add_serve, _add_pipeline, _add_monitor):
        add(sub, common)
    return p


def _add_validate(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("validate", parents=[common], help="check raw data (Great Expectations) and split it")
    s.add_argument("--data", help="raw CSV/JSONL/Parquet file (default: data.path from params)")
    s.add_argument("--out", default="out/validate", help="folder for splits and report")
    s.add_argument("--report", help="also write the JSON report here, even when validation fails")


def _add_tokenize(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("tokenize", parents=[common], help="tokenize the splits with the base model's tokenizer")
    s.add_argument("--splits", default="out/validate")
    s.add_argument("--out", default="out/tokenize")


def _add_train(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("train", parents=[common], help="fine-tune the base model")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--model", default="out/model", help="folder for the fine-tuned model")
    s.add_argument("--train-logs", default="out/train", help="folder for loss.csv, val.csv and summary.json")
    s.add_argument("--checkpoints", default="out/checkpoints", help="checkpoint folder ('' = no checkpoints)")


def _add_evaluate(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("evaluate", parents=[common], help="score the model on the test split")
    s.add_argument("--model", default="out/model")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--out", default="out/evaluate")


def _add_distill(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("distill", parents=[common], help="train a smaller student on the model's soft targets")
    s.add_argument("--model", default="out/model", help="the teacher")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--out", default="out/student")
    s.add_argument("--checkpoints", default="out/distill_checkpoints", help="checkpoints and the cached teacher "
                                                                           "logits ('' = none)")


def _add_compress(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("compress", parents=[common], help="ONNX + int8 variants, measured and gated on the test split")
    s.add_argument("--model", default="out/model")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--out", default="out/compress")
    s.add_argument("--students", nargs="*", default=[], help="student model folders (finetune distill) measured "
                                                             "and offered for serving with the teacher's variants")


def _add_register(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("register", parents=[common], help="log to MLflow, register, gate the champion alias")
    s.add_argument("--model", default="out/model")
    s.add_argument("--evaluation", default="out/evaluate")
    s.add_argument("--splits", default="out/validate")
    s.add_argument("--train-logs", default="out/train")
    s.add_argument("--tokens", default="out/tokenize", help="tokenize output: token-length stats for the report")
    s.add_argument("--compress", default="", help="compress output: register its int8 variant when it passed its "
                                                  "gate (as <register.model_name>-int8); add its figures to the report")
    s.add_argument("--out", default="out/register", help="folder for registration.json, model_card.md, report.html")


def _add_tune(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("tune", parents=[common], help="hyperparameter search (Optuna) on the validation split",
                       description="Search the params.yaml tune.space: each trial trains on the train split and is "
                                   "scored on the validation split (never the test split); trials are nested MLflow "
                                   "runs (MLFLOW_TRACKING_URI, or the project's mlflow.db) and resume from "
                                   "tune.storage. Writes best_params.yaml, trials.csv and search.png to --out.")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--out", default="out/tune")
    s.add_argument("--base", help="base model (default: model.base), same as --set model.base=...")
    s.add_argument("--trials", type=int, help="finished trials the study ends with (default: tune.trials)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--trial", action="store_true", help="run one trial with the --set values and print its "
                                                          "validation metrics as name=value lines (Katib)")
    mode.add_argument("--katib", action="store_true", help="print the Katib Experiment of this search (YAML)")
    s.add_argument("--cluster-config", default="pipelines/cluster.yaml", help="with --katib: GPU, resources, "
                                                                                "secrets of the trial pods")


def _add_predict(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("predict", parents=[common], help="label texts with a registered model",
                       description="Label texts with a registered model; prints one JSON object per text: "
                                   '{"text", "label", "probabilities": {label: p}}. MLflow: MLFLOW_TRACKING_URI, '
                                   "or the project's mlflow.db when unset.")
    s.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    s.add_argument("--model", help="model URI (default: models:/<register.model_name>@champion)")
    s.add_argument("--input", help="one text per line ('\\n' or '\\r\\n' end a line; blank lines skipped), or a "
                                   ".jsonl/.csv/.parquet file with a text column ('-' = stdin, one text per line)")
    s.add_argument("--text-column", help="the text column of a table --input (default: data.text_column)")
    s.add_argument("--output", help="write JSON lines to this file (default: stdout); written as it goes into a "
                                    "temporary file renamed to OUTPUT at the end")
    s.add_argument("--force", action="store_true", help="replace an existing --output file")
    s.add_argument("--batch-size", type=int, default=256, help="texts per model call (at most 1000)")


def _add_monitor(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("monitor", parents=[common], help="drift of a batch of texts against a registered version",
                       description="Compare a batch (CSV/JSONL/Parquet with a text column, labels optional, or a "
                                   "request-log folder) with the version's reference profile. Exit 0: no drift, "
                                   "3: drift, 1: error, 2: bad config. MLflow: MLFLOW_TRACKING_URI, or mlflow.db.")
    s.add_argument("--model", help="model URI (default: models:/<register.model_name>@champion)")
    s.add_argument("--input", required=True, help="the batch: a .csv/.jsonl/.parquet file or a request-log folder")
    s.add_argument("--out", default="out/monitor", help="output folder: metrics.json, report.html")
    s.add_argument("--since", help="a request-log folder's records from this time on (ISO 8601, UTC by default)")


def _add_compare(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("compare", parents=[common], help="challenger vs champion (or two runs): metrics, params",
                       description="Compare the challenger with the champion (default), two aliases, or two runs.")
    s.add_argument("--model", help="registered model name (default: register.model_name)")
    s.add_argument("--aliases", nargs=2, metavar=("BASE", "OTHER"), default=["champion", "challenger"],
                   help="compare OTHER against BASE (default: champion challenger)")
    s.add_argument("--runs", nargs=2, metavar=("BASE_RUN", "OTHER_RUN"), help="compare two MLflow run ids instead")


def _add_materialize(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("materialize", parents=[common],
                       help="write the bundled Rotten Tomatoes data set to data.path (no network)")
    s.add_argument("--out", help="destination (default: data.path from params)")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")


def _add_serve(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common], help="serve a registered model over HTTP (V1 and v2 protocols)",
                       description="Serve the model (checked against the registry's digests before it loads) on "
                                   "HTTP: /v1/models/<name>:predict, /v2/models/<name>/infer, /v2/health/ready, "
                                   "/metrics. Settings: params.yaml serve:. MLflow: MLFLOW_TRACKING_URI, or the "
                                   "project's mlflow.db when unset.")
    s.add_argument("--model", help="models:/<name>@champion, models:/<name>/<version> or a local MLflow model folder "
                                   "(default: models:/<register.model_name>@champion)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--token-file", help="require 'Authorization: Bearer <token>' on inference routes, the token read "
                                        "from this file (default: the file $FINETUNE_SERVE_TOKEN_FILE names)")


def _add_pipeline(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile the spec, submit a run")
    psub = s.add_subparsers(dest="action", required=True)
    c = psub.add_parser("compile", parents=[common], help="write pipelines/finetune_pipeline.yaml")
    c.add_argument("--out", default="pipelines/finetune_pipeline.yaml")
    c.add_argument("--cluster-config", default="pipelines/cluster.yaml", help="GPU, node selector, secrets, retries")
    c = psub.add_parser("submit", parents=[common], help="start a run on a Kubeflow Pipelines API")
    c.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kfp.example.com/pipeline")
    c.add_argument("--experiment", default="finetune")
    c.add_argument("--run-name")
    c.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    c.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default: $KFP_TOKEN)")
    c.add_argument("--package-file", default="pipelines/finetune_pipeline.yaml")
    c.add_argument("--service-account", default="finetune-pipeline",
                   help="Kubernetes service account of the run's pods (k8s/base/rbac.yaml); '' = namespace default")
    c.add_argument("--arg", dest="args", action="append", default=[], metavar="NAME=VALUE",
                   help="per-run pipeline parameter (data_uri, data_md5, checkpoint_dir, git_rev), e.g. "
                        "--arg data_uri=s3://bucket/reviews.csv; a dotted NAME (train.epochs=3) is a --set")


# ---- dispatch: one call per verb, given the verb's module ----

def _validate(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    stage.run_validate(cfg, args.data or cfg.data.path, args.out, args.report)


def _tokenize(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    stage.run_tokenize(cfg, args.splits, args.out)


def _train(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    stage.run_train(cfg, args.tokens, args.model, args.train_logs, args.checkpoints or None)


def _evaluate(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    stage.run_evaluate(cfg, args.model, args.tokens, args.out)


def _distill(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    stage.run_distill(cfg, args.model, args.tokens, args.out, args.checkpoints or None)


def _compress(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    stage.run_compress(cfg, args.model, args.tokens, args.out, students=args.students)


def _register(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    uri, artifact_location = tracking.configure(".")
    stage.run_register(cfg, args.model, args.evaluation, args.splits, args.train_logs, args.out,
                       lineage.collect(cfg.data.path, root="."), uri, artifact_location, tokens=args.tokens or None,
                       compress=args.compress or None)


def _tune(runner: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    raw = apply_overrides(read_params(args.params), args.overrides)  # what cfg was built from: trials rebuild it
    if args.trial:
        runner.run_tune_trial(raw, args.tokens)
        return
    uri, artifact_location = tracking.configure(".")
    tracking.require_reachable(uri)
    runner.run_tune(raw, args.tokens, args.out, (uri, artifact_location))


def _katib(katib: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    _enter_project_root("tune --katib")
    pipeline = importlib.import_module("pipelines.finetune_pipeline")  # the data URI the pipeline defaults to
    cluster = yaml.safe_load(Path(args.cluster_config).read_text(encoding="utf-8"))
    print(katib.render(cfg, cluster, pipeline.DEFAULT_DATA_URI), end="")


def _predict(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    stage.run_predict(cfg, args.texts, args.input, args.text_column, args.model, args.output, args.batch_size,
                      args.force)


def _compare(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    print(stage.run_compare(cfg, args.model, tuple(args.aliases), tuple(args.runs) if args.runs else None), end="")


def _materialize(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    dest = args.out or cfg.data.path
    path, written = stage.materialize(dest, force=True) if args.force else stage.materialize_tracked(dest)
    log.info("%s %s", "wrote" if written else "kept existing", path)


def _serve(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    stage.run_serve(cfg, args.model, args.host, args.port, args.token_file)


def _monitor(stage: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    uri, _ = tracking.configure(".")
    if stage.run_monitor(cfg, args.model, args.input, args.out, uri, args.since)["drift"]:
        raise SystemExit(stage.DRIFT_EXIT)  # outputs and the MLflow run are written: only the status differs


def _compile(pipeline: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    cluster = yaml.safe_load(Path(args.cluster_config).read_text(encoding="utf-8"))
    log.info("wrote %s", pipeline.compile_spec(args.out, cfg, cluster))


def _submit(submit: ModuleType, args: argparse.Namespace, cfg: Config) -> None:
    arguments = submit.build_arguments(args.params, args.overrides, args.args, args.package_file)
    run = submit.submit(args.host, args.package_file, args.experiment, arguments, args.run_name, args.namespace,
                        args.token, args.service_account or None)
    print(f"submitted run {getattr(run, 'run_id', run)} to {args.host} (experiment {args.experiment})")


# command -> (the module that does its work, the call above). The module is imported only when its command runs:
# each command then loads only its own heavy dependencies (torch, mlflow, great_expectations, optuna, kfp), and
# `finetune --version` or `finetune validate` none of the others'. tune --katib and pipeline's two actions are
# commands of their own here.
COMMANDS: dict[str, tuple[str, Callable[[ModuleType, argparse.Namespace, Config], None]]] = {
    "validate": ("finetune.stages.validate", _validate),
    "tokenize": ("finetune.stages.tokenize", _tokenize),
    "train": ("finetune.stages.train", _train),
    "evaluate": ("finetune.stages.evaluate", _evaluate),
    "distill": ("finetune.stages.distill", _distill),
    "compress": ("finetune.stages.compress", _compress),
    "register": ("finetune.stages.register", _register),
    "tune": ("finetune.tuning.runner", _tune),
    "katib": ("finetune.cluster.katib", _katib),
    "predict": ("finetune.stages.predict", _predict),
    "compare": ("finetune.stages.compare", _compare),
    "materialize": ("finetune.stages.materialize", _materialize),
    "serve": ("finetune.stages.serve", _serve),
    "monitor": ("finetune.stages.monitor", _monitor),
    "compile": ("pipelines.finetune_pipeline", _compile),  # the project's file: found from the project root
    "submit": ("finetune.cluster.submit", _submit),
}

# The errors that end a command with one line and exit 1 instead of a traceback, as "module:Class". Matched only
# among modules already imported: an exception of a class can only come from a module that was imported, so
# nothing is imported to recognise one.
EXPECTED = (
    "finetune.stages:StageFailed", "finetune.tuning.search:TuneError", "finetune.common.files:DataError",
    "finetune.common.base_model:ModelNotFound", "finetune.common.tokens:TokenizerError",
    "finetune.training.recipe:TrainingError", "finetune.training.model:MismatchError",
    "finetune.registry.request:RegistryError", "finetune.stages.materialize:DataSetMismatch",
    "finetune.common.sources:SourceError", "finetune.cluster.submit:SubmitError",
    "finetune.registry.comparison:CompareError", "finetune.stages.predict:PredictInputError",
    "finetune.common.outputs:UnsafeOutput", "finetune.common.tracking:TrackingUnreachable",
    "finetune.tasks:TaskError",
    "finetune.monitoring.tasks:MonitorInputError",
)


def command_name(args: argparse.Namespace) -> str:
    """The COMMANDS key of the parsed arguments."""
    if args.command == "pipeline":
        return args.action
    if args.command == "tune" and args.katib:
        return "katib"
    return args.command


def _expected(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError):
        return True
    for entry in EXPECTED:
        module, _, name = entry.partition(":")
        if module in sys.modules and isinstance(exc, getattr(sys.modules[module], name)):
            return True
    return False


def _dispatch(args: argparse.Namespace, cfg: Config) -> None:
    module, call = COMMANDS[command_name(args)]
    if args.command == "pipeline":
        _enter_project_root(args.command)
    call(importlib.import_module(module), args, cfg)


def _enter_project_root(command: str) -> None:
    """pipelines/ is the project's, not the package's: it is imported from the working directory."""
    root = Path.cwd()
    if not (root / "pipelines" / "finetune_pipeline.py").is_file():
        raise FileNotFoundError(f"run `finetune {command}` from the project root (no pipelines/ in {root})")
    sys.path.insert(0, str(root))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    if args.command == "tune":  # shorthands for --set: validated with the rest
        args.overrides = [*([f"model.base={args.base}"] if args.base else []),
                          *([f"tune.trials={args.trials}"] if args.trials is not None else []), *args.overrides]
    try:
        # predict and compare also work outside a project (no params.yaml): defaults then
        optional = args.command in ("predict", "compare") and not Path(args.params).exists() and not args.overrides
        cfg = Config() if optional else load_config(args.params, args.overrides)
        _dispatch(args, cfg)
    except ConfigError as exc:  # exit 2, like argparse: the settings are wrong, not the data
        where = "" if exc.located else f"{args.params}: "
        print(f"finetune {args.command}: error: {where}{exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _expected(exc):
            raise
        print(f"finetune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
