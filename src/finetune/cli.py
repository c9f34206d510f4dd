"""`finetune <stage>`: thin wrappers that read params.yaml, move paths, and call the stage cores.

dvc.yaml calls these commands; the KFP components call the same `run_*` functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config

log = logging.getLogger("finetune")


class StageFailed(Exception):
    """A stage refused its input: message for the user, no traceback."""


# ---- one run_<verb> per stage: paths + config in, files out. Shared by the CLI and the KFP components. ----

def run_validate(cfg: Config, data: str | Path, out: str | Path, report: str | Path | None = None) -> dict[str, Any]:
    from .io import write_json
    from .validate import failure_message, validate, write_splits

    result = validate(data, cfg.data, cfg.validate)
    if report is not None:  # the report is wanted even (especially) when validation fails
        write_json(report, result.report)
    if not result.ok:
        raise StageFailed("validation failed, no splits written:\n" + failure_message(result.report))
    write_splits(result, out)
    log.info("validation passed: %s", {s: v["rows"] for s, v in result.report["splits"].items()})
    return result.report


def run_tokenize(cfg: Config, splits: str | Path, out: str | Path) -> dict[str, Any]:
    from .base_model import resolve_base
    from .tokenize import read_splits, tokenize, write_tokens

    frames, labels = read_splits(splits)
    tokens, meta = tokenize(frames, labels, resolve_base(cfg.model.base), cfg.tokenize)
    write_tokens(tokens, meta, out)
    log.info("tokenized: %s", meta["stats"])
    return meta


def run_train(cfg: Config, tokens: str | Path, model: str | Path, logs: str | Path,
              checkpoints: str | Path | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    from .base_model import resolve_base
    from .io import write_json
    from .tokenize import read_tokens
    from .train import train, write_history

    toks, meta = read_tokens(tokens)
    result = train(toks, meta, resolve_base(cfg.model.base), cfg.train, model, checkpoints)
    write_json(Path(model) / "finetune_config.json", cfg.to_dict())  # the resolved config travels with the model
    write_history(result, logs)
    log.info("trained %d steps in %.1fs (%.1f samples/s): val accuracy %.4f", result.steps, result.seconds,
             result.samples_per_second, result.val_accuracy)
    return {k: v for k, v in asdict(result).items() if k != "history"}


def run_evaluate(cfg: Config, model: str | Path, tokens: str | Path, out: str | Path) -> dict[str, Any]:
    from .evaluate import evaluate, write_evaluation
    from .tokenize import read_tokens

    toks, meta = read_tokens(tokens, names=("test",))
    result = evaluate(model, toks["test"], meta, cfg.evaluate, device=cfg.train.device)
    write_evaluation(result, out)
    log.info("test accuracy %.4f, macro-F1 %.4f", result.metrics["accuracy"], result.metrics["macro_f1"])
    return result.metrics


def run_register(cfg: Config, model: str | Path, evaluation: str | Path, splits: str | Path,
                 train_logs: str | Path | None, out: str | Path, lineage: dict[str, Any],
                 tracking_uri: str, artifact_location: str | None = None) -> dict[str, Any]:
    import csv

    import pandas as pd

    from .io import read_json, write_json
    from .lineage import split_hash
    from .register import as_dict, register

    metrics = read_json(Path(evaluation) / "metrics.json")
    test = pd.read_parquet(Path(splits) / "test.parquet")
    history = []
    artifacts: dict[str, Path] = {"evaluation": Path(evaluation), "validation": Path(splits) / "report.json"}
    if train_logs and Path(train_logs).is_dir():
        with (Path(train_logs) / "loss.csv").open(encoding="utf-8") as fh:
            history = [{"step": int(r["step"]), "loss": float(r["loss"])} for r in csv.DictReader(fh)]
        artifacts["training"] = Path(train_logs)
    reg = register(model, metrics, cfg.register, tracking_uri=tracking_uri, artifact_location=artifact_location,
                   params=cfg.flat(), lineage=lineage, loss_history=history, artifacts=artifacts,
                   test_hash=split_hash(test), test=(test["text"].tolist(), test["label"].tolist()),
                   max_length=cfg.tokenize.max_length)
    out_dict = as_dict(reg)
    write_json(Path(out) / "registration.json", out_dict)
    log.info("registered %s version %s as @%s: %s", reg.model_name, reg.version, reg.alias, reg.reason)
    return out_dict


# ---- argument parsing ----

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params value (repeatable), e.g. --set train.epochs=1")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    common.add_argument("-q", "--quiet", action="count", default=0, help="less log output")

    p = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained text classifiers end to end.")
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
    s.add_argument("--logs", default="out/train", help="folder for loss.csv and summary.json")
    s.add_argument("--checkpoints", default="out/checkpoints", help="checkpoint folder ('' = no checkpoints)")

    s = sub.add_parser("evaluate", parents=[common], help="score the model on the test split")
    s.add_argument("--model", default="out/model")
    s.add_argument("--tokens", default="out/tokenize")
    s.add_argument("--out", default="out/evaluate")

    s = sub.add_parser("register", parents=[common], help="log to MLflow, register, gate the champion alias")
    s.add_argument("--model", default="out/model")
    s.add_argument("--evaluation", default="out/evaluate")
    s.add_argument("--splits", default="out/validate")
    s.add_argument("--train-logs", default="out/train")
    s.add_argument("--out", default="out/register")

    s = sub.add_parser("materialize", parents=[common],
                       help="write the bundled Rotten Tomatoes data set to data.path (no network)")
    s.add_argument("--out", help="destination (default: data.path from params)")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    return p


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(max(-1, min(verbosity, 1)), logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("great_expectations", "mlflow", "urllib3", "alembic", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # Library progress bars and load reports are noise in a pipeline log; ours stay.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _dispatch(args: argparse.Namespace, cfg: Config) -> None:
    if args.command == "validate":
        run_validate(cfg, args.data or cfg.data.path, args.out, args.report)
    elif args.command == "tokenize":
        run_tokenize(cfg, args.splits, args.out)
    elif args.command == "train":
        run_train(cfg, args.tokens, args.model, args.logs, args.checkpoints or None)
    elif args.command == "evaluate":
        run_evaluate(cfg, args.model, args.tokens, args.out)
    elif args.command == "register":
        from . import lineage, tracking

        uri, artifact_location = tracking.configure(".")
        run_register(cfg, args.model, args.evaluation, args.splits, args.train_logs, args.out,
                     lineage.collect(cfg.data.path), uri, artifact_location)
    elif args.command == "materialize":
        from .sample_data import materialize, materialize_tracked

        dest = args.out or cfg.data.path
        path, written = materialize(dest, force=True) if args.force else materialize_tracked(dest)
        log.info("%s %s", "wrote" if written else "kept existing", path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose - args.quiet)
    from .base_model import ModelNotFound
    from .evaluate import MismatchError
    from .io import DataError
    from .register import RegistryError
    from .sample_data import DataSetMismatch
    from .tokenize import TokenizerError
    from .train import TrainingError

    expected = (StageFailed, ConfigError, DataError, ModelNotFound, TokenizerError, TrainingError, MismatchError,
                RegistryError, FileNotFoundError, DataSetMismatch)
    try:
        cfg = load_config(args.params, args.overrides)
        _dispatch(args, cfg)
    except expected as exc:
        print(f"finetune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
