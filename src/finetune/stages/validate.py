"""validate: check the raw data with Great Expectations, then split it deterministically.

Core: ``validate(data_path, data_cfg, cfg) -> ValidationResult``; nothing is written here.
``write_splits`` stores a passing result atomically; a failing one yields no splits at all.
"""

from __future__ import annotations

import logging
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from finetune.common.config import Config, DataConfig, ValidateConfig
from finetune.common.files import DataError, read_table, write_json
from finetune.common.lineage import file_md5
from finetune.common.outputs import atomic_dir, check_output_dir
from finetune.common.sources import fetch
from finetune.common.token_files import read_tagged
from finetune.common.tokens import SPLITS
from finetune.reporting.validation_summary import failure_message, render_summary
from finetune.stages import StageFailed
from finetune.tasks import task_for
from finetune.tasks.ner_data import check_frame, check_tagged, given_splits
from finetune.tasks.token import tag_names

log = logging.getLogger("finetune")  # the stage's own lines: "INFO finetune: ..."


@dataclass
class ValidationResult:
    ok: bool
    report: dict[str, Any]
    labels: list[str] = field(default_factory=list)
    splits: dict[str, pd.DataFrame] = field(default_factory=dict)

    def summary(self) -> str:
        return render_summary(self.report)


def _rule(name: str, column: str | None, ok: bool, message: str, rows: list[int] | None = None,
          values: list[Any] | None = None, max_examples: int = 5, source: str = "finetune") -> dict[str, Any]:
    rows = [int(r) for r in (rows or [])]
    examples = [{"row": r, "value": _short(v)} for r, v in zip(rows[:max_examples], (values or [None] * len(rows)))]
    return {"rule": name, "column": column, "success": ok, "source": source, "message": message,
            "unexpected_count": len(rows), "examples": examples}


def _short(v: Any, n: int = 80) -> Any:
    if isinstance(v, str) and len(v) > n:
        return v[:n] + f"... ({len(v)} chars)"
    return None if v is None or (isinstance(v, float) and pd.isna(v)) else v


# Great Expectations rule names in our report -> expectation classes and kwargs.
def _expectations(text: str, label: str, cfg: ValidateConfig, label_set: list[str]) -> list[tuple[str, Any]]:

    exps = [
        ("text_not_null", gxe.ExpectColumnValuesToNotBeNull(column=text)),
        ("label_not_null", gxe.ExpectColumnValuesToNotBeNull(column=label)),
        ("text_not_blank", gxe.ExpectColumnValuesToMatchRegex(column=text, regex=r"\S")),
        ("text_length", gxe.ExpectColumnValueLengthsToBeBetween(column=text, min_value=cfg.min_chars,
                                                                  max_value=cfg.max_chars)),
    ]
    if label_set:
        exps.append(("label_in_set", gxe.ExpectColumnValuesToBeInSet(column=label, value_set=label_set)))
    return exps


def _run_great_expectations(df: pd.DataFrame, text: str, label: str, cfg: ValidateConfig,
                            label_set: list[str]) -> list[dict[str, Any]]:

    ctx = gx.get_context(mode="ephemeral")  # in memory: writes no files
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = ctx.data_sources.add_pandas("raw").add_dataframe_asset("raw").add_batch_definition_whole_dataframe("all")
    named = _expectations(text, label, cfg, label_set)
    suite = ctx.suites.add(gx.ExpectationSuite(name="raw_text_classification"))
    for _, exp in named:
        suite.add_expectation(exp)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="raw", data=batch, suite=suite))
    res = vd.run(batch_parameters={"dataframe": df}, result_format="COMPLETE")
    by_type = {}
    for r in res.results:
        by_type.setdefault((r.expectation_config.type, r.expectation_config.kwargs.get("column")), []).append(r)
    rules = []
    for name, exp in named:
        r = by_type[(exp.expectation_type, exp.column)].pop(0)
        # GE gives plain index values, or dicts of {index name: value, column: value} for a named index
        rows = [x["row"] if isinstance(x, dict) else x for x in r.result.get("unexpected_index_list") or []]
        values = [df.at[i, exp.column] for i in rows[: cfg.max_examples]]
        rules.append(_rule(name, exp.column, bool(r.success), f"{exp.expectation_type} "
                           f"{ {k: v for k, v in r.expectation_config.kwargs.items() if k not in ('batch_id', 'column')} }",
                           rows, values, cfg.max_examples, source="great_expectations"))
    return rules


_NOT_SCALAR = (dict, list, tuple, set, np.ndarray)


def _labels_are_scalars(labels: pd.Series, column: str, cfg: ValidateConfig) -> dict[str, Any]:
    """A struct or list label (Parquet, JSONL) would become the class "{'k': 'fresh'}" or "['fresh']"."""
    bad = [i for i, v in labels.items() if isinstance(v, _NOT_SCALAR)]
    if not bad:
        return _rule("label_is_scalar", column, True, "every label is a single value")
    lists = any(isinstance(labels.at[i], (list, tuple, set, np.ndarray)) for i in bad)
    hint = ("; several labels per text is the multi-label task (task: multi_label in params.yaml, docs/tasks.md); "
            "this run's task is single-label: one class per text") if lists else \
        "; give each row one label (a string or a number), e.g. the struct's field as a column of its own"
    return _rule("label_is_scalar", column, False, f"labels must be single values, not "
                 f"{'lists' if lists else 'structs/objects'}{hint}", bad,
                 [_as_text(labels.at[i]) for i in bad[: cfg.max_examples]], cfg.max_examples)


def _as_text(v: Any) -> str:
    return str(v.tolist() if isinstance(v, np.ndarray) else v)


def _normalise_labels(df: pd.DataFrame, column: str, cfg: ValidateConfig) -> tuple[pd.DataFrame, list[dict]]:
    """String labels in Unicode NFC (NFC and NFD "café" are the same word, invisibly different bytes), and
    labels differing only by surrounding whitespace refused, or stripped with validate.strip_labels."""
    raw = df[column]
    nfc = raw.map(lambda v: unicodedata.normalize("NFC", v) if isinstance(v, str) else v)
    rules = []
    changed = [i for i in raw.index if isinstance(raw.at[i], str) and nfc.at[i] != raw.at[i]]
    if changed:
        rules.append(_rule("labels_unicode_nfc", column, True, f"normalised {len(changed)} label(s) to Unicode NFC "
                           f"(the same characters, composed), e.g. {ascii(raw.at[changed[0]])} -> "
                           f"{ascii(nfc.at[changed[0]])}", changed, [nfc.at[i] for i in changed[: cfg.max_examples]],
                           cfg.max_examples))
    strings = nfc[nfc.map(lambda v: isinstance(v, str))]
    padded = strings[strings != strings.str.strip()]
    if padded.empty:
        return df.assign(**{column: nfc}), rules
    if cfg.strip_labels:
        r = _rule("labels_stripped", column, True, f"stripped surrounding whitespace from {len(padded)} label(s) "
                  f"(validate.strip_labels: true)", list(padded.index), list(padded.head(cfg.max_examples)),
                  cfg.max_examples)
        return df.assign(**{column: nfc.map(lambda v: v.strip() if isinstance(v, str) else v)}), rules + [r]
    counts = strings.value_counts()
    groups = {}
    for value, n in counts.items():
        groups.setdefault(value.strip(), {})[value] = int(n)
    clashes = {k: v for k, v in groups.items() if len(v) > 1}
    if not clashes:  # e.g. " fresh" alone: label_in_set (or the inferred class name) shows it
        return df.assign(**{column: nfc}), rules
    rows = [i for i in padded.index if padded.at[i].strip() in clashes]
    variants = "; ".join(", ".join(f"{v!r} x{n}" for v, n in sorted(g.items())) for g in clashes.values())
    return df, rules + [_rule("labels_whitespace_variants", column, False, f"labels that differ only by "
                              f"surrounding whitespace would be separate classes: {_cap(variants)}; clean the data "
                              f"or set validate.strip_labels: true", rows,
                              [padded.at[i] for i in rows[: cfg.max_examples]], cfg.max_examples)]


def _cap(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def split_frame(df: pd.DataFrame, cfg: ValidateConfig, task: str = "single_label") -> dict[str, pd.DataFrame]:
    """The task's seeded, stratified split (per class for single-label, iterative stratification for
    multi-label), stable under row reordering."""
    return task_for(task).split_rows(df, cfg)


def _type_rules(df: pd.DataFrame, text: str, label: str, cfg: ValidateConfig) -> list[dict[str, Any]]:
    """Texts must be strings (JSONL/Parquet may carry numbers or objects); labels may be any scalar but one type."""
    not_str = [i for i, v in df[text].items() if v is not None and not pd.isna(v) and not isinstance(v, str)]
    rules = [_rule("text_is_string", text, not not_str, "text values must be strings", not_str,
                   [df.at[i, text] for i in not_str[: cfg.max_examples]], cfg.max_examples)]
    label_types = df[label].dropna().map(lambda v: type(v).__name__)
    mixed = label_types.nunique() > 1
    odd = list(label_types[label_types != label_types.mode().iat[0]].index) if mixed else []
    types = sorted(label_types.unique())
    rules.append(_rule("label_single_type", label, not mixed,
                       f"labels mix types {types}" if mixed else f"all labels have one type ({', '.join(types)})", odd,
                       [df.at[i, label] for i in odd[: cfg.max_examples]], cfg.max_examples))
    rules.append(_labels_are_scalars(df[label], label, cfg))
    return rules


def _text_rules(df: pd.DataFrame, text: str, label: str, split: str,
                cfg: ValidateConfig) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Conflicting labels, split values and leakage, duplicates: the rules and the (text, label[, _split]) frame,
    without the dropped duplicates."""
    rules: list[dict[str, Any]] = []
    frame = pd.DataFrame({"text": df[text], "label": df[label]}, index=df.index)
    key = frame["text"].str.strip()

    # The same text with two labels is contradictory whatever the duplicate policy.
    n_labels = frame.groupby(key)["label"].transform("nunique")
    conflict = list(frame.index[n_labels > 1])
    rules.append(_rule("duplicate_text_conflicting_labels", text, not conflict,
                       "the same text carries different labels" if conflict else
                       "no text carries two different labels", conflict,
                       [frame.at[i, "text"] for i in conflict[: cfg.max_examples]], cfg.max_examples))

    if split in df.columns:
        sp = df[split].astype(str)
        bad = list(sp.index[~sp.isin(SPLITS)])
        rules.append(_rule("split_values", split, not bad, f"split must be one of {list(SPLITS)}", bad,
                           [sp.at[i] for i in bad[: cfg.max_examples]], cfg.max_examples))
        leak = list(frame.index[sp.groupby(key).transform("nunique") > 1])
        rules.append(_rule("text_in_one_split", text, not leak, "the same text appears in more than one split "
                           "(train/test leakage)" if leak else "every text is in one split only", leak,
                           [frame.at[i, "text"] for i in leak[: cfg.max_examples]], cfg.max_examples))
        frame = frame.assign(_split=sp)

    dup = list(frame.index[key.duplicated(keep="first")])
    if cfg.duplicates == "fail":
        rules.append(_rule("no_duplicate_texts", text, not dup, "duplicate texts, compared after trimming leading and "
                           "trailing whitespace (validate.duplicates=fail)" if dup else "no duplicate texts", dup,
                           [frame.at[i, "text"] for i in dup[: cfg.max_examples]], cfg.max_examples))
    else:
        r = _rule("no_duplicate_texts", text, True, f"dropped {len(dup)} duplicate row(s) (same text once leading and "
                  f"trailing whitespace is trimmed), kept the first",
                  dup, [frame.at[i, "text"] for i in dup[: cfg.max_examples]], cfg.max_examples)
        r["dropped"] = len(dup)
        rules.append(r)
        frame = frame.drop(index=dup)
    return frame, rules


def _class_rules(counts: pd.Series, labels: list[str], label: str, cfg: ValidateConfig) -> list[dict[str, Any]]:
    """At least two classes, and enough rows in each named one."""
    small = {k: int(v) for k, v in counts.items() if v < cfg.min_rows_per_class}
    absent = [lab for lab in labels if lab not in counts.index]
    return [_rule("at_least_two_classes", label, len(counts) >= 2,
                  f"found {len(counts)} class(es) {list(counts.index)}; a classifier needs at least 2"),
            _rule("min_rows_per_class", label, not small and not absent,
                  f"each class needs >= {cfg.min_rows_per_class} rows; too few: {small}, absent: {absent}"
                  if small or absent else f"every class has >= {cfg.min_rows_per_class} rows")]


def validate(data_path: str | Path, data_cfg: DataConfig, cfg: ValidateConfig,
             workspace: str | Path | None = None, task_name: str = "single_label") -> ValidationResult:
    """Check ``data_path`` against the rules; on success return train/val/test frames (columns text, label).
    A relative ``data_path`` may not lead out of ``workspace`` ('..' or a symlink). The task reads and checks
    its labels first (multi-label: a list per row, joined into one string), then the common rules run."""
    task = task_for(task_name)
    path = str(data_path)
    text, label, split = data_cfg.text_column, data_cfg.label_column, data_cfg.split_column
    report: dict[str, Any] = {"data": path, "rules": [], "success": False}

    def fail(extra_rules: list[dict[str, Any]]) -> ValidationResult:
        report["rules"].extend(extra_rules)
        report["success"] = False
        return ValidationResult(False, report)

    try:
        df = read_table(path, workspace)
    except DataError as e:
        return fail([_rule(e.rule, None, False, e.message, e.rows, None, cfg.max_examples)])
    report["rows"] = int(len(df))
    report["columns"] = [str(c) for c in df.columns]

    missing = [c for c in (text, label) if c not in df.columns]
    if missing:
        return fail([_rule("required_columns", ",".join(missing), False,
                           f"missing column(s) {missing}; found {report['columns']} "
                           f"(set data.text_column / data.label_column)")])

    df, rules, label_set = task.prepare_labels(df, label, data_cfg.label_separator, cfg)
    if not all(r["success"] for r in rules):
        return fail(rules)
    rules += _type_rules(df, text, label, cfg)
    if not all(r["success"] for r in rules):
        return fail(rules)
    df, label_rules = _normalise_labels(df, label, cfg)
    rules += label_rules
    if not all(r["success"] for r in label_rules):
        return fail(rules)

    df = df.assign(**{label: df[label].map(lambda v: v if pd.isna(v) else str(v))})
    rules += _run_great_expectations(df, text, label, cfg, label_set)
    if not all(r["success"] for r in rules):
        return fail(rules)

    frame, found = _text_rules(df, text, label, split, cfg)
    rules += found
    if not all(r["success"] for r in rules):
        return fail(rules)

    counts = task.label_counts(frame["label"])
    labels = list(cfg.labels) if cfg.labels else sorted(counts.index)
    report["labels"] = labels
    report["labels_inferred"] = not cfg.labels
    report["class_counts"] = {k: int(v) for k, v in counts.items()}
    rules += _class_rules(counts, labels, label, cfg)
    if not all(r["success"] for r in rules):
        return fail(rules)

    if "_split" in frame.columns:
        splits = {s: frame[frame["_split"] == s].drop(columns="_split") for s in SPLITS}
    else:
        splits = task.split_rows(frame, cfg)
    empty = [s for s, f in splits.items() if len(f) == 0]
    rules.append(_rule("splits_not_empty", None, not empty,
                       f"empty split(s): {empty}" if empty else "train, val and test all have rows"))
    if empty:
        return fail(rules)
    return _passed(report, rules, labels, splits, cfg, task)


def validate_tagged(data_path: str | Path, data_cfg: DataConfig, cfg: ValidateConfig,
                    workspace: str | Path | None = None) -> ValidationResult:
    """validate for token-tagged data (task token): CoNLL text or JSONL/Parquet token/tag lists, the tag rules,
    IOB2 inside, split stratified by each sentence's rarest entity type."""
    path = str(data_path)
    report: dict[str, Any] = {"data": path, "rules": [], "success": False}
    try:
        data = check_tagged(read_tagged(path, split_column=data_cfg.split_column), path, data_cfg.tag_scheme,
                            list(cfg.labels) or None, cfg.max_examples)
    except (DataError, ValueError) as e:  # ValueError: data.tag_scheme names no scheme
        report["rules"] = [_rule(e.rule, None, False, e.message, e.rows, None, cfg.max_examples)
                           if isinstance(e, DataError) else _rule("tag_scheme", None, False, f"data.tag_scheme: {e}")]
        return ValidationResult(False, report)
    frame, rules = check_frame(data, path, cfg.duplicates, cfg.max_examples)
    report.update(rows=int(len(data.frame)), tag_scheme=data.scheme, entity_types=data.types)
    if not all(r["success"] for r in rules):
        report["rules"] = rules
        return ValidationResult(False, report)
    splits, given = given_splits(frame, path, data_cfg.split_column)  # the file's split column, if any
    rules += given
    if not all(r["success"] for r in given):
        report["rules"] = rules
        return ValidationResult(False, report)
    splits = splits or split_frame(frame, cfg, "token")  # else stratified by each sentence's rarest entity type
    labels = tag_names(data.types)
    report["labels"] = labels
    return _passed(report, rules, labels, splits, cfg, task_for("token"))


def _passed(report: dict[str, Any], rules: list[dict[str, Any]], labels: list[str],
            splits: dict[str, pd.DataFrame], cfg: ValidateConfig, task) -> ValidationResult:
    """The result of data that passed every rule: the report gains the splits' sizes and class balance."""
    report["rules"] = rules
    report["success"] = True
    report["splits"] = {s: {"rows": int(len(f)), "classes": {k: int(v) for k, v in
                                                             task.label_counts(f["label"]).items()}}
                        for s, f in splits.items()}
    report["class_balance"] = task.class_balance(splits, labels)
    report["warnings"] = task.balance_warnings(report["class_balance"], cfg.min_class_fraction)
    return ValidationResult(True, report, labels, splits)


def write_splits(result: ValidationResult, out_dir: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Write splits + labels + reports into ``out_dir`` atomically. Only for a passing result.
    ``inputs``: the raw data file(s), which ``out_dir`` must not contain (io.check_output_dir)."""
    if not result.ok:
        raise ValueError("refusing to write splits for data that failed validation")
    with atomic_dir(out_dir, "validate", inputs) as tmp:
        for name, frame in result.splits.items():
            frame.reset_index().to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / "labels.json", result.labels)
        write_json(tmp / "report.json", result.report)
        (tmp / "report.md").write_text(result.summary(), encoding="utf-8")
    return Path(out_dir)


def run_validate(cfg: Config, data: str | Path, out: str | Path, report: str | Path | None = None,
                 expected_md5: str | None = None) -> dict[str, Any]:
    """``data`` is a path or a URI (s3://, dvc://). ``expected_md5``, when given, must match the fetched bytes."""


    inputs = [] if "://" in str(data) else [data]  # a URI is fetched into a temp folder: nothing local to protect
    check_output_dir(out, inputs)  # before any work: a refused folder fails in a second, not after validation
    with tempfile.TemporaryDirectory(prefix="finetune-data-") as tmp:
        local = fetch(str(data), tmp)
        md5 = file_md5(local) if local.is_file() else None
        if expected_md5 and md5 != expected_md5:
            raise StageFailed(f"{data}: content md5 {md5} differs from the expected {expected_md5}: "
                              f"the data changed since the run was submitted")
        # a task that reads token-tagged files (task token) says so; the others read a table of texts
        tagged = getattr(task_for(cfg.task), "INPUT", "table") == "tagged_tokens"
        result = validate_tagged(local, cfg.data, cfg.validate, workspace=Path.cwd()) if tagged else \
            validate(local, cfg.data, cfg.validate, workspace=Path.cwd(), task_name=cfg.task)
    result.report.update(data=str(data), data_md5=md5)
    if report is not None:  # the report is wanted even (especially) when validation fails
        write_json(report, result.report)
    if not result.ok:
        raise StageFailed("validation failed, no splits written:\n" + failure_message(result.report))
    write_splits(result, out, inputs)
    log.info("validation passed: %s", {s: v["rows"] for s, v in result.report["splits"].items()})
    # the floor check is logged, not written: register.floor must not make the splits (and training) stale
    floor = task_for(cfg.task).floor_warning(result.report["class_balance"], cfg.register.floor, cfg.register.metric)
    for warning in result.report["warnings"] + ([floor] if floor else []):
        log.warning(warning)
    return result.report
