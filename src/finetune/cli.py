"""`finetune <stage>`: parse arguments, load params.yaml, call the stage's ``run_<verb>`` (stages.py).

dvc.yaml calls these commands; the Kubeflow components call the same ``run_<verb>`` functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from finetune.common.coercion import ConfigError
from finetune.common.config import Config
from finetune.common.params import load_config
from finetune.stages import StageFailed
from finetune.stages.compress import run_compress
from finetune.stages.evaluate import run_evaluate
from finetune.stages.predict import PredictInputError
from finetune.stages.register import run_register
from finetune.stages.tokenize import run_tokenize
from finetune.stages.train import run_train
from finetune.stages.validate import run_validate

log = logging.getLogger("finetune")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finetune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params value (repeatable), e.g. --set train.epochs=1")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    common.add_argument("-q", "--quiet", action="count", default=0, help="less log output")

    p = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained text classifiers end to end.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", parents=[common], help="check raw data (Great Expectations) and split it")
    s.add_argument("--data", help="raw CSV/JSONL/Parquet file (default: data.path from params)")
    s.add_argument("--out", default="out/validate", help="folder for splits and report")
    s.add_argument("--report", help="also write the JSON report here, even when validation fails")

    s = sub.add_parser("tokenize", parents=[common], help="tokenize the splits with the base model's tokenizer")
    s.add_argument("--splits", default="out/validate")
    s.add_argument("--out", default="out/tokenize")

    s = sub.add_parser("train", parents=[common], help="fine-tune the base model")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--model", default="out/model", help="folder for the fine-tuned model")
    s.add_argument("--train-logs", default="out/train", help="folder for loss.csv, val.csv and summary.json")
    s.add_argument("--checkpoints", default="out/checkpoints", help="checkpoint folder ('' = no checkpoints)")

    s = sub.add_parser("evaluate", parents=[common], help="score the model on the test split")
    s.add_argument("--model", default="out/model")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--out", default="out/evaluate")

    s = sub.add_parser("compress", parents=[common], help="ONNX + int8 variants, measured and gated on the test split")
    s.add_argument("--model", default="out/model")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--out", default="out/compress")

    s = sub.add_parser("register", parents=[common], help="log to MLflow, register, gate the champion alias")
    s.add_argument("--model", default="out/model")
    s.add_argument("--evaluation", default="out/evaluate")
    s.add_argument("--splits", default="out/validate")
    s.add_argument("--train-logs", default="out/train")
    s.add_argument("--tokens", default="out/tokenize", help="tokenize output: token-length stats for the report")
    s.add_argument("--compress", default="", help="compress output: register its int8 variant when it passed its "
                                                  "gate (as <register.model_name>-int8); add its figures to the report")
    s.add_argument("--out", default="out/register", help="folder for registration.json, model_card.md, report.html")

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

    s = sub.add_parser("predict", parents=[common], help="label texts with a registered model",
                       description="Label texts with a registered model; prints one JSON object per text: "
                                   '{"text", "label", "probabilities": {label: p}}. MLflow: MLFLOW_TRACKING_URI, '
                                   "or the project's mlflow.db when unset.")
    s.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    s.add_argument("--model", help="model URI (default: models:/<register.model_name>@champion)")
    s.add_argument("--input", help="one text per line ('\\n' or '\\r\\n' end a line; blank lines skipped), or a "
                                   ".jsonl/.csv/.parquet file with a text column ('-' = stdin, one text per line)")
    s.add_argument("--text-column", help="the text column of a table --input (default: data.text_column)")
    s.add_argument("--output", help="write JSON lines here (default: stdout)")
    s.add_argument("--batch-size", type=int, default=256)

    s = sub.add_parser("compare", parents=[common], help="challenger vs champion (or two runs): metrics, params",
                       description="Compare the challenger with the champion (default), two aliases, or two runs.")
    s.add_argument("--model", help="registered model name (default: register.model_name)")
    s.add_argument("--aliases", nargs=2, metavar=("BASE", "OTHER"), default=["champion", "challenger"],
                   help="compare OTHER against BASE (default: champion challenger)")
    s.add_argument("--runs", nargs=2, metavar=("BASE_RUN", "OTHER_RUN"), help="compare two MLflow run ids instead")

    s = sub.add_parser("materialize", parents=[common],
                       help="write the bundled Rotten Tomatoes data set to data.path (no network)")
    s.add_argument("--out", help="destination (default: data.path from params)")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")

    _add_serve(sub, common)

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
    return p


def _add_serve(sub, common) -> None:
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


def _pipeline(args: argparse.Namespace, cfg: Config) -> None:
    import yaml

    root = Path.cwd()
    if not (root / "pipelines" / "finetune_pipeline.py").is_file():
        raise FileNotFoundError(f"run `finetune pipeline` from the project root (no pipelines/ in {root})")
    sys.path.insert(0, str(root))
    if args.action == "compile":
        from pipelines.finetune_pipeline import compile_spec

        cluster = yaml.safe_load(Path(args.cluster_config).read_text(encoding="utf-8"))
        log.info("wrote %s", compile_spec(args.out, cfg, cluster))
        return
    from finetune.cluster.submit import build_arguments, submit

    arguments = build_arguments(args.params, args.overrides, args.args, args.package_file)
    run = submit(args.host, args.package_file, args.experiment, arguments, args.run_name, args.namespace, args.token,
                 args.service_account or None)
    print(f"submitted run {getattr(run, 'run_id', run)} to {args.host} (experiment {args.experiment})")


def _tune(args: argparse.Namespace, cfg: Config) -> None:
    from finetune.common.params import apply_overrides, read_params

    if args.katib:
        import yaml

        from finetune.cluster.katib import render

        sys.path.insert(0, str(Path.cwd()))
        from pipelines.finetune_pipeline import DEFAULT_DATA_URI

        cluster = yaml.safe_load(Path(args.cluster_config).read_text(encoding="utf-8"))
        print(render(cfg, cluster, DEFAULT_DATA_URI), end="")
        return
    raw = apply_overrides(read_params(args.params), args.overrides)  # what cfg was built from: trials rebuild it
    if args.trial:
        from finetune.tuning.runner import run_tune_trial

        run_tune_trial(raw, args.tokens)
        return
    from finetune.common import tracking
    from finetune.tuning.runner import run_tune

    uri, artifact_location = tracking.configure(".")
    tracking.require_reachable(uri)
    run_tune(raw, args.tokens, args.out, (uri, artifact_location))


def _predict(args: argparse.Namespace, cfg: Config) -> None:
    from finetune.common import tracking
    from finetune.stages.predict import predict, read_texts, write_jsonl

    if bool(args.texts) == bool(args.input):
        raise PredictInputError("give either TEXT arguments or --input FILE")
    texts = args.texts or read_texts(args.input, sys.stdin if args.input == "-" else None,
                                     args.text_column or cfg.data.text_column)
    uri = args.model or f"models:/{cfg.register.model_name}@champion"
    store, _ = tracking.configure(".")
    tracking.require_reachable(store)  # fail fast when the server is down, not after MLflow's retries
    from finetune.registry.loading import load_verified

    model = load_verified(uri, store)  # every file checked against the registry's digests before loading
    records = predict(model, texts, args.batch_size)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as fh:
            write_jsonl(records, fh)
        log.info("wrote %d predictions to %s", len(records), args.output)
    else:
        write_jsonl(records, sys.stdout)


def _compare(args: argparse.Namespace, cfg: Config) -> None:
    from mlflow import MlflowClient

    from finetune.common import tracking
    from finetune.registry.comparison import sides_from_registry, sides_from_runs
    from finetune.stages.compare import compare, format_comparison

    uri, _ = tracking.configure(".")
    tracking.require_reachable(uri)
    client = MlflowClient(uri)
    if args.runs:
        base, other = sides_from_runs(client, *args.runs)
    else:
        base, other = sides_from_registry(client, args.model or cfg.register.model_name, *args.aliases)
    print(format_comparison(compare(base, other)), end="")


NOISY = ("great_expectations", "mlflow", "urllib3", "alembic", "httpx", "matplotlib")


class _LibraryFilter(logging.Filter):
    """Drops library records below ``level``. On the handler, not on the libraries' loggers: Great Expectations
    sets INFO on its own module loggers when imported, which would undo a level set here beforehand."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.name.partition(".")[0] not in NOISY


class _RedactFilter(logging.Filter):
    """Credentials in a URI never reach the log, whoever logs it (our code, MLflow, urllib3...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from finetune.common.redact import redact_text

        message = record.getMessage()
        safe = redact_text(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(max(-1, min(verbosity, 1)), logging.DEBUG)
    # MLflow installs its own INFO handler (propagate=False) when imported unless told not to: its records then
    # come through ours and obey -q/-v like the rest.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if "mlflow" in sys.modules:  # imported already (in-process callers): undo what its import configured
        logging.getLogger("mlflow").handlers, logging.getLogger("mlflow").propagate = [], True
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.StreamHandler) or handler.stream not in (sys.stderr, sys.__stderr__):
            continue  # e.g. pytest's capture handlers
        for old in [f for f in handler.filters if isinstance(f, _LibraryFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_LibraryFilter(max(level, logging.WARNING)))
        if not any(isinstance(f, _RedactFilter) for f in handler.filters):
            handler.addFilter(_RedactFilter())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # Library progress bars and load reports are noise in a pipeline log; ours stay.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _dispatch(args: argparse.Namespace, cfg: Config) -> None:
    if args.command == "pipeline":
        _pipeline(args, cfg)
    elif args.command == "validate":
        run_validate(cfg, args.data or cfg.data.path, args.out, args.report)
    elif args.command == "tokenize":
        run_tokenize(cfg, args.splits, args.out)
    elif args.command == "train":
        run_train(cfg, args.tokens, args.model, args.train_logs, args.checkpoints or None)
    elif args.command == "evaluate":
        run_evaluate(cfg, args.model, args.tokens, args.out)
    elif args.command == "compress":
        run_compress(cfg, args.model, args.tokens, args.out)
    elif args.command == "register":
        from finetune.common import lineage, tracking

        uri, artifact_location = tracking.configure(".")
        run_register(cfg, args.model, args.evaluation, args.splits, args.train_logs, args.out,
                     lineage.collect(cfg.data.path, root="."), uri, artifact_location, tokens=args.tokens or None,
                     compress=args.compress or None)
    elif args.command == "tune":
        _tune(args, cfg)
    elif args.command == "predict":
        _predict(args, cfg)
    elif args.command == "compare":
        _compare(args, cfg)
    elif args.command == "serve":
        from finetune.stages.serve import run_serve

        run_serve(cfg, args.model, args.host, args.port, args.token_file)
    elif args.command == "materialize":
        from finetune.stages.materialize import materialize, materialize_tracked

        dest = args.out or cfg.data.path
        path, written = materialize(dest, force=True) if args.force else materialize_tracked(dest)
        log.info("%s %s", "wrote" if written else "kept existing", path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose - args.quiet)
    from finetune.cluster.submit import SubmitError
    from finetune.common.base_model import ModelNotFound
    from finetune.common.files import DataError
    from finetune.common.outputs import UnsafeOutput
    from finetune.common.sources import SourceError
    from finetune.common.tokens import TokenizerError
    from finetune.common.tracking import TrackingUnreachable
    from finetune.registry.comparison import CompareError
    from finetune.registry.request import RegistryError
    from finetune.stages.materialize import DataSetMismatch
    from finetune.stages.train import TrainingError
    from finetune.training.model import MismatchError
    from finetune.tuning.search import TuneError

    expected = (StageFailed, TuneError, DataError, ModelNotFound, TokenizerError, TrainingError, MismatchError,
                RegistryError, FileNotFoundError, DataSetMismatch, SourceError, SubmitError, CompareError,
                PredictInputError, UnsafeOutput, TrackingUnreachable)
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
    except expected as exc:
        print(f"finetune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
