import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, toy_frame
from finetune.cli import main
from finetune.common.config import DataConfig, ValidateConfig
from finetune.common.tokens import SPLITS
from finetune.stages.validate import split_frame, validate, write_splits

CFG = ValidateConfig(labels=["fresh", "rotten"], min_rows_per_class=5, val_fraction=0.2, test_fraction=0.2)


def write_params(tmp_path: Path, labels=("fresh", "rotten"), extra: str = "") -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(f"validate:\n  labels: {list(labels)}\n  min_rows_per_class: 5\n{extra}")
    return p


def test_good_data_splits_disjoint_stratified_deterministic(tmp_path):
    df = toy_frame(30)
    df.to_csv(tmp_path / "d.csv", index=False)
    r = validate(tmp_path / "d.csv", DataConfig(), CFG)
    assert r.ok, r.summary()
    texts = {s: set(r.splits[s]["text"]) for s in SPLITS}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"]) and not (texts["val"] & texts["test"])
    assert sum(len(t) for t in texts.values()) == 60
    for s in SPLITS:  # stratified: both classes in every split, test/val 20% of each class
        assert set(r.splits[s]["label"]) == {"fresh", "rotten"}
    assert (r.splits["test"]["label"] == "fresh").sum() == 6
    # stable under row order: shuffling the file gives the same assignment
    df.sample(frac=1, random_state=3).to_csv(tmp_path / "shuffled.csv", index=False)
    r2 = validate(tmp_path / "shuffled.csv", DataConfig(), CFG)
    assert {s: set(r2.splits[s]["text"]) for s in SPLITS} == texts


def test_split_frame_respects_seed():
    df = toy_frame(30)
    a = split_frame(df, CFG)
    b = split_frame(df, ValidateConfig(**{**CFG.__dict__, "seed": 7}))
    assert set(a["test"]["text"]) != set(b["test"]["text"])


def test_exact_duplicates_dropped_and_reported(tmp_path):
    df = pd.concat([toy_frame(20), toy_frame(20).head(3)])
    df.to_csv(tmp_path / "d.csv", index=False)
    r = validate(tmp_path / "d.csv", DataConfig(), CFG)
    assert r.ok
    rule = next(x for x in r.report["rules"] if x["rule"] == "no_duplicate_texts")
    assert rule["dropped"] == 3 and [e["row"] for e in rule["examples"]] == [41, 42, 43]
    assert sum(len(s) for s in r.splits.values()) == 40
    failing = validate(tmp_path / "d.csv", DataConfig(), ValidateConfig(**{**CFG.__dict__, "duplicates": "fail"}))
    assert not failing.ok and not failing.splits


def test_report_names_trimmed_duplicates_and_passing_checks_neutrally(tmp_path):
    df = toy_frame(20)
    padded = df.head(2).assign(text=lambda f: "  " + f["text"] + " \t")  # duplicates only once trimmed
    pd.concat([df, padded]).to_csv(tmp_path / "d.csv", index=False)
    r = validate(tmp_path / "d.csv", DataConfig(), CFG)
    assert r.ok
    msg = {x["rule"]: x["message"] for x in r.report["rules"]}
    assert msg["no_duplicate_texts"] == ("dropped 2 duplicate row(s) (same text once leading and trailing whitespace "
                                         "is trimmed), kept the first")
    assert msg["label_single_type"] == "all labels have one type (str)"
    assert msg["duplicate_text_conflicting_labels"] == "no text carries two different labels"
    assert msg["min_rows_per_class"] == "every class has >= 5 rows"
    assert "exact" not in r.summary() and "mix types" not in r.summary()


def test_path_out_of_the_project_is_not_blamed_on_a_symlink(tmp_path, monkeypatch, capsys):
    (tmp_path / "ws").mkdir()
    monkeypatch.chdir(tmp_path / "ws")
    params = write_params(tmp_path)
    assert main(["validate", "--params", str(params), "--set", "data.path=../../etc/passwd", "--out", "out"]) == 1
    err = capsys.readouterr().err
    assert "../../etc/passwd: rule 'path_in_workspace' failed: is outside the project folder" in err, err
    assert "symlink" not in err


def test_labels_inferred_when_not_configured(tmp_path):
    toy_frame(20).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    r = validate(tmp_path / "d.jsonl", DataConfig(), ValidateConfig(labels=[], min_rows_per_class=5))
    assert r.ok and r.labels == ["fresh", "rotten"] and r.report["labels_inferred"] is True


def test_parquet_and_custom_column_names(tmp_path):
    toy_frame(20).rename(columns={"text": "review", "label": "y"}).to_parquet(tmp_path / "d.parquet")
    r = validate(tmp_path / "d.parquet", DataConfig(text_column="review", label_column="y"), CFG)
    assert r.ok and list(r.splits["train"].columns) == ["text", "label"]


def test_write_splits_is_complete_and_refuses_failures(tmp_path):
    toy_frame(20).to_csv(tmp_path / "d.csv", index=False)
    r = validate(tmp_path / "d.csv", DataConfig(), CFG)
    write_splits(r, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".finetune-output", "labels.json", "report.json", "report.md", "test.parquet", "train.parquet", "val.parquet"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["success"] is True
    bad = validate(tmp_path / "missing.csv", DataConfig(), CFG)
    with pytest.raises(ValueError):
        write_splits(bad, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# ---- malformed inputs: each must fail with the rule and rows named, exit 1, and leave nothing behind ----

def _csv(text: str) -> bytes:
    return text.encode("utf-8")


def _good_rows(n=6):
    return "".join(f"good movie {i},fresh\nbad movie {i},rotten\n" for i in range(n))


BAD_INPUTS = {
    "missing_column": ("d.csv", _csv("review,label\n" + _good_rows()), "required_columns", None),
    "null_text": ("d.csv", _csv("text,label\n" + _good_rows() + ",fresh\n"), "text_not_null", "13"),
    "empty_file": ("d.csv", b"", "not_empty", None),
    "header_only": ("d.csv", b"text,label\n", "not_empty", None),
    "unknown_label": ("d.csv", _csv("text,label\n" + _good_rows() + "meh movie,meh\n"), "label_in_set", "13"),
    "wrong_encoding": ("d.csv", "text,label\ncaf\u00e9 society,fresh\n".encode("latin-1") + _csv(_good_rows()),
                       "utf8_encoding", "line 2"),
    "one_class": ("d.csv", _csv("text,label\n" + "".join(f"good {i},fresh\n" for i in range(12))),
                  "min_rows_per_class", None),
    "leak_across_splits": ("d.csv", _csv("text,label,split\n" + "".join(
        f"good {i},fresh,{'train' if i < 8 else 'test'}\nbad {i},rotten,{'train' if i < 8 else 'val'}\n"
        for i in range(12)) + "good 0,fresh,test\n"), "text_in_one_split", "1"),
    "binary_junk": ("d.csv", bytes(range(256)) * 4, "utf8_encoding", None),
    "nul_bytes": ("d.csv", _csv("text,label\n" + _good_rows() + "bad\x00data,fresh\n"), "no_nul_bytes", "line 14"),
    "blank_text": ("d.csv", _csv("text,label\n" + _good_rows() + '"   ",rotten\n'), "text_not_blank", "13"),
    "conflicting_labels": ("d.csv", _csv("text,label\n" + _good_rows() + "good movie 1,rotten\n"),
                           "duplicate_text_conflicting_labels", "3"),
    "ragged_rows": ("d.csv", _csv("text,label\n" + _good_rows() + "a,b,c\n"), "csv_format", "line 14"),
    "non_string_text": ("d.jsonl", _csv("".join(json.dumps({"text": f"t {i}", "label": "fresh" if i % 2 else "rotten"})
                                                + "\n" for i in range(12)) + '{"text": 12345, "label": "fresh"}\n'),
                        "text_is_string", "13"),
    "not_found": (None, None, "file_exists", None),
    "truncated_bz2": ("d.csv.bz2", None, "compression", None),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_clearly(case, tmp_path, capsys):
    name, content, rule, where = BAD_INPUTS[case]
    if case == "truncated_bz2":
        import bz2

        content = bz2.compress(_csv("text,label\n" + _good_rows(50)))[:-40]
    path = tmp_path / (name or "nope.csv")
    if content is not None:
        path.write_bytes(content)
    before = path.read_bytes() if path.exists() else None
    params = write_params(tmp_path)
    code = main(["validate", "--params", str(params), "--data", str(path), "--out", str(tmp_path / "out"),
                 "--report", str(tmp_path / "report.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"rule '{rule}' failed" in err and str(path) in err, err
    if where:
        assert where in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no splits, no partial folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["success"] is False and any(r["rule"] == rule and not r["success"] for r in report["rules"])
    if before is not None:
        assert path.read_bytes() == before  # input untouched


def test_cli_subprocess_exit_code_and_message(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n" + _good_rows() + ",fresh\n")
    params = write_params(tmp_path)
    proc = subprocess.run([str(BIN / "finetune"), "validate", "--params", str(params), "--data",
                           str(tmp_path / "d.csv"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "rule 'text_not_null' failed column 'text'" in proc.stderr and "row(s) 13" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# More hostile inputs. Each builder makes the input under tmp_path and returns (path argument, rule, a fragment
# the message must contain, extra params). Paths may be relative: the CLI runs with tmp_path/ws as cwd.
def _utf16(t):
    (t / "d.csv").write_bytes(("text,label\n" + _good_rows()).encode("utf-16"))  # BOM FF FE, then UTF-16
    return "d.csv", "utf8_encoding", "byte 0", ""


def _huge_text(t):
    (t / "d.csv").write_text("text,label\n" + _good_rows() + "x" * 10_000_000 + ",fresh\n")
    return "d.csv", "text_length", "13", ""


def _truncated_gzip(t):
    import gzip

    (t / "d.csv.gz").write_bytes(gzip.compress(_csv("text,label\n" + _good_rows(50)))[:-30])
    return "d.csv.gz", "compression", "truncated", ""


def _parquet_wrong_schema(t):
    pd.DataFrame({"text": list(range(14)), "label": ["fresh", "rotten"] * 7}).to_parquet(t / "d.parquet")
    return "d.parquet", "text_is_string", "row(s) 1", ""


def _directory(t):
    (t / "adir.csv").mkdir()
    return "adir.csv", "file_exists", "is a directory", ""


def _symlink_out(t):
    (t.parent / "outside.csv").write_text("text,label\n" + _good_rows())
    (t / "link.csv").symlink_to(t.parent / "outside.csv")
    return "link.csv", "path_in_workspace", "outside the workspace", ""


def _dotdot_out(t):
    (t.parent / "outside.csv").write_text("text,label\n" + _good_rows())
    return "../outside.csv", "path_in_workspace", "is outside the project folder", ""


def _mixed_label_types(t):
    rows = [{"text": f"t{i}", "label": "fresh" if i % 2 else "rotten"} for i in range(12)] + [{"text": "x", "label": 1}]
    (t / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "d.jsonl", "label_single_type", "13", ""


def _duplicates_refused(t):
    (t / "d.csv").write_text("text,label\n" + _good_rows() + "good movie 2,fresh\n")
    return "d.csv", "no_duplicate_texts", "13", "  duplicates: fail\n"


def _quoted_empty(t):
    (t / "d.csv").write_text("text,label\n" + _good_rows() + '"",rotten\n')
    return "d.csv", "text_not_null", "13", ""


MORE_BAD = {f.__name__.strip("_"): f for f in (_utf16, _huge_text, _truncated_gzip, _parquet_wrong_schema, _directory,
                                                 _symlink_out, _mixed_label_types, _duplicates_refused, _quoted_empty,
                                                 _dotdot_out)}


@pytest.mark.parametrize("case", sorted(MORE_BAD))
def test_more_hostile_inputs(case, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    arg, rule, where, extra = MORE_BAD[case](ws)
    monkeypatch.chdir(ws)
    params = write_params(tmp_path, extra=extra)
    before = sorted(p.name for p in ws.iterdir())
    code = main(["validate", "--params", str(params), "--data", arg, "--out", "out", "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 1 and f"rule '{rule}' failed" in err and where in err and arg in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in ws.iterdir()) == before  # nothing written next to the data
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False


def test_bom_utf8_file_is_fine(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbf" + _csv("text,label\n" + _good_rows(10)))
    r = validate(tmp_path / "d.csv", DataConfig(), CFG)
    assert r.ok and "text" in r.report["columns"]


def test_data_changed_since_submission_is_refused(tmp_path):
    from finetune.common.config import Config
    from finetune.stages import StageFailed
    from finetune.stages.validate import run_validate

    toy_frame(20).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(StageFailed, match="differs from the expected 0123"):
        run_validate(Config(), tmp_path / "d.csv", tmp_path / "out", expected_md5="0123")
    assert not (tmp_path / "out").exists()


def _parquet_labels(path: Path, labels: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"review {i}" for i in range(len(labels))], "label": labels}), path)


@pytest.mark.parametrize("kind", ["struct", "list"])
def test_struct_and_list_labels_are_refused_with_rule_and_rows(kind, tmp_path, capsys):
    plain = ["fresh", "rotten"] * 10
    labels = [{"k": lab} for lab in plain] if kind == "struct" else [[lab] for lab in plain]
    _parquet_labels(tmp_path / "d.parquet", labels)
    params = write_params(tmp_path, labels=())  # inferred labels: before the fix these became 2 "classes"
    code = main(["validate", "--params", str(params), "--data", str(tmp_path / "d.parquet"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "rule 'label_is_scalar' failed column 'label'" in err, err
    assert "20 row(s), e.g. row(s) 1, 2, 3, 4, 5" in err and "Traceback" not in err
    if kind == "list":
        assert "multi-label task (task: multi_label" in err
    else:
        assert "structs" in err and "multi_label" not in err
    assert not (tmp_path / "out").exists()


def test_labels_differing_by_surrounding_whitespace_are_refused_or_stripped(tmp_path):
    df = toy_frame(20)
    df.loc[df.index[::4], "label"] = " fresh "  # rows 1, 5, 9...: all fresh rows
    df.to_csv(tmp_path / "d.csv", index=False)
    inferred = ValidateConfig(**{**CFG.__dict__, "labels": []})
    r = validate(tmp_path / "d.csv", DataConfig(), inferred)
    rule = next(x for x in r.report["rules"] if x["rule"] == "labels_whitespace_variants")
    assert not r.ok and not r.splits and not rule["success"]
    assert "' fresh ' x10, 'fresh' x10" in rule["message"] and "validate.strip_labels: true" in rule["message"]
    assert [e["row"] for e in rule["examples"]] == [1, 5, 9, 13, 17]

    stripped = validate(tmp_path / "d.csv", DataConfig(), ValidateConfig(**{**inferred.__dict__, "strip_labels": True}))
    assert stripped.ok and stripped.labels == ["fresh", "rotten"]
    assert stripped.report["class_counts"] == {"fresh": 20, "rotten": 20}
    assert "- ok   labels_stripped [label]: stripped surrounding whitespace from 10 label(s)" in stripped.summary()


def test_nfc_and_nfd_labels_are_one_class_and_the_report_says_so(tmp_path):
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    df = toy_frame(20).replace({"label": {"fresh": nfc}})
    df.loc[df.index[::4], "label"] = nfd
    df.to_csv(tmp_path / "d.csv", index=False)
    r = validate(tmp_path / "d.csv", DataConfig(), ValidateConfig(**{**CFG.__dict__, "labels": []}))
    assert r.ok and r.labels == [nfc, "rotten"] and r.report["class_counts"] == {nfc: 20, "rotten": 20}
    assert "labels_unicode_nfc [label]: normalised 10 label(s) to Unicode NFC" in r.summary()
    assert set(pd.concat(r.splits.values())["label"]) == {nfc, "rotten"}
    # configured labels written in NFD match the data too
    configured = validate(tmp_path / "d.csv", DataConfig(), ValidateConfig(**{**CFG.__dict__, "labels": [nfd, "rotten"]}))
    assert configured.ok and configured.labels == [nfc, "rotten"]
    toy_frame(20).to_csv(tmp_path / "plain.csv", index=False)
    assert "labels_unicode_nfc" not in validate(tmp_path / "plain.csv", DataConfig(), CFG).summary()


def test_a_fifo_is_refused_in_one_line_without_hanging(tmp_path):
    import os

    os.mkfifo(tmp_path / "x.csv")
    params = write_params(tmp_path)
    proc = subprocess.run([str(BIN / "finetune"), "validate", "--params", str(params), "--data",
                           str(tmp_path / "x.csv"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # before the fix: blocked forever
    assert proc.returncode == 1, proc.stderr
    assert "rule 'regular_file' failed" in proc.stderr and "is not a regular file" in proc.stderr
    assert str(tmp_path / "x.csv") in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
