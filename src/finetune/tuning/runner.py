"""`finetune tune`: the search over the tokenized splits, and one Katib trial."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from finetune.common.base_model import check_model_limits, resolve_base
from finetune.common.outputs import atomic_dir, check_output_dir
from finetune.common.params import config_from_dict
from finetune.common.redact import redact_uri
from finetune.common.tokens import read_tokens
from finetune.common.tracking import project_root
from finetune.stages.train import train
from finetune.tuning.search import check_space, check_storage, trial_config, tune, write_outputs
from finetune.tuning.search_log import SearchLog

log = logging.getLogger("finetune")  # the stage's own lines: "INFO finetune: ..."


def run_tune(raw: dict[str, Any], tokens: str | Path, out: str | Path,
             tracking: tuple[str, str | None] | None) -> dict[str, Any]:
    """The search of ``tune:`` on the train and val splits (the test split is not even read), trials logged as
    nested MLflow runs under one parent (``tracking``: (uri, artifact location), or None for no MLflow);
    ``out``: best_params.yaml, trials.csv, search.png. ``raw``: params.yaml with any --set applied."""


    cfg = config_from_dict(raw)
    storage = check_storage(project_root("."), cfg.tune.storage,
                            [os.environ.get("MLFLOW_TRACKING_URI"), tracking[0] if tracking else None])
    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    check_output_dir(out, [tokens, base])
    toks, meta = read_tokens(tokens, names=("train", "val"))
    logs = []

    def open_log(parent: str | None):

        t = cfg.tune
        logs.append(SearchLog(tracking[0], cfg.register.experiment, tracking[1], parent,
                              tags={"study": t.study, "storage": str(storage)},
                              params={**{f"tune.{k}": v for k, v in vars(t).items() if k != "space"},
                                      "tune.space": json.dumps(t.space)}))
        return logs[-1]

    try:
        result = tune(raw, toks, meta, base, storage, open_log if tracking else None)
        with atomic_dir(out, "tune", [tokens, base]) as tmp:
            write_outputs(result, tmp, cfg.tune.storage)
    except BaseException:
        if logs:
            logs[-1].finish({}, {}, None, "FAILED")
        raise
    if logs:
        logs[-1].finish({f"best_{result.metric}": result.best_value},
                        {"best_trial": str(result.best_number), "best_params": json.dumps(result.best_params)},
                        out, "FINISHED")
        log.info("tune: MLflow parent run %s at %s", logs[-1].parent, redact_uri(tracking[0]))
    log.info("tune: best %s %.4f (trial %d): %s; wrote %s/best_params.yaml", result.metric, result.best_value,
             result.best_number, result.best_params, out)
    return {"best_number": result.best_number, "best_value": result.best_value, "best_params": result.best_params,
            "trials": result.trials, "parent_run": result.parent_run}


def run_tune_trial(raw: dict[str, Any], tokens: str | Path, emit=print) -> dict[str, float]:
    """One trial as Katib runs it: params (+ its --set values) with the tune budget, trained on the train split;
    each validation row printed as ``val_accuracy=0.83`` lines (Katib's StdOut metrics collector reads them)."""


    tune_cfg = config_from_dict(raw).tune
    check_space(raw, tune_cfg)  # the same keys as the search: a Katib trial applies only train.*
    cfg = trial_config(raw, tune_cfg, {})  # the budget; the trial's values are already in raw (--set)
    base = resolve_base(cfg.model.base)
    check_model_limits(cfg, base)
    toks, meta = read_tokens(tokens, names=("train", "val"))

    def line(row: dict[str, float]) -> str:
        return " ".join(f"{k}={v:.6g}" for k, v in row.items() if k != "step")

    with tempfile.TemporaryDirectory(prefix="finetune-trial-") as tmp:
        result = train(toks, meta, base, cfg.train, Path(tmp) / "model", None,
                       on_eval=lambda row: emit(f"{line(row)} step={row['step']}"))
    final = {k: float(v) for k, v in result.val_history[-1].items() if k != "step"}
    emit(line(final))
    return final
