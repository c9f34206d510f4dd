"""Reading token-tagged files: CoNLL text (tab or space, tag last, -DOCSTART-, blank-line separated), JSONL and
Parquet rows of token and tag lists; broken files refused with file, line and rule."""

import json

import pandas as pd
import pytest

from finetune.common.files import DataError
from finetune.common.token_files import read_tagged

CONLL_2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_2003_four_columns_tag_last_docstart_ignored(tmp_path):
    f = tmp_path / "train.conll"
    f.write_text(CONLL_2003)
    got = read_tagged(f)
    assert [s.tokens for s in got] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert [s.tags for s in got] == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
    assert got[1].lines == [8, 9]  # the file's own line numbers, for refusals


def test_tab_separated_with_tab_only_separator_lines(tmp_path):
    f = tmp_path / "wnut.txt"
    f.write_text("New\tB-geo-loc\nYork\tI-geo-loc\n\t\nhi\tO\n")
    got = read_tagged(f)
    assert [(s.tokens, s.tags) for s in got] == [(["New", "York"], ["B-geo-loc", "I-geo-loc"]), (["hi"], ["O"])]


def test_tab_separated_token_keeps_its_inner_space_for_the_whitespace_rule(tmp_path):
    f = tmp_path / "a.conll"
    f.write_text("New York\tB-loc\n")
    assert read_tagged(f)[0].tokens == ["New York"]


def test_a_line_without_a_tag_is_refused_with_its_line(tmp_path):
    f = tmp_path / "a.conll"
    f.write_text("EU B-ORG\n\nrejects\n")
    with pytest.raises(DataError) as exc:
        read_tagged(f)
    assert exc.value.rule == "token_tag_columns" and exc.value.rows == [3] and "a.conll" in str(exc.value)
    assert "line 3" in str(exc.value)


def test_jsonl_and_parquet_rows_of_token_and_tag_lists(tmp_path):
    rows = [{"tokens": ["I", "love", "Paris"], "tags": ["O", "O", "B-LOC"]}, {"tokens": ["ok"], "tags": ["O"]}]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(p)
    for f in (j, p):
        got = read_tagged(f)
        assert [s.tokens for s in got] == [["I", "love", "Paris"], ["ok"]]
        assert got[1].lines == [2]


def test_integer_tag_ids_are_refused_with_the_row(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"tokens": ["a"], "ner_tags": [3]}) + "\n")
    with pytest.raises(DataError) as exc:
        read_tagged(j)
    assert exc.value.rule == "token_strings" and exc.value.rows == [1]
