import numpy as np
import pytest

from conftest import toy_frame
from finetune.common.config import TokenizeConfig
from finetune.common.tokens import TokenizerError, read_tokens
from finetune.stages.tokenize import tokenize, write_tokens


def test_tokenize_unpadded_ids_and_roundtrip(base_model_dir, tmp_path):
    df = toy_frame(10)
    df.loc[0, "text"] = "word " * 100  # longer than max_length: truncated
    splits = {"train": df.iloc[:12], "val": df.iloc[12:16], "test": df.iloc[16:]}
    toks, meta = tokenize(splits, ["fresh", "rotten"], base_model_dir, TokenizeConfig(max_length=16, batch_size=5))
    tr = toks["train"]
    assert len(tr) == 12 and tr.lengths.max() == 16 and meta["stats"]["train"]["truncated"] == 1
    assert tr.lengths.min() < 16  # not padded to max
    assert all(tr.sequence(i)[0] == meta["tokenizer"]["cls_token_id"] for i in range(len(tr)))
    assert list(tr.labels) == [0 if lab == "fresh" else 1 for lab in df.iloc[:12]["label"]]
    write_tokens(toks, meta, tmp_path / "tok")
    back, meta2 = read_tokens(tmp_path / "tok")
    assert meta2 == meta
    for s in ("train", "val", "test"):
        assert np.array_equal(back[s].ids, toks[s].ids) and np.array_equal(back[s].offsets, toks[s].offsets)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        tokenize({"train": toy_frame(2)}, ["fresh", "rotten"], tmp_path, TokenizeConfig())


def test_lengths_csv_gives_each_splits_length_distribution(base_model_dir, tmp_path):
    import csv

    df = toy_frame(10)
    df.loc[0, "text"] = "word " * 100
    splits = {"train": df.iloc[:12], "val": df.iloc[12:16], "test": df.iloc[16:]}
    toks, meta = tokenize(splits, ["fresh", "rotten"], base_model_dir, TokenizeConfig(max_length=16))
    write_tokens(toks, meta, tmp_path / "tok")
    with (tmp_path / "tok" / "lengths.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["length", "train", "val", "test"] and [int(r["length"]) for r in rows] == list(range(1, 17))
    for s in ("train", "val", "test"):
        shares = np.array([float(r[s]) for r in rows])
        assert shares.sum() == pytest.approx(1.0, abs=1e-5)
        expected = np.bincount(toks[s].lengths, minlength=17)[1:] / len(toks[s])
        assert np.allclose(shares, expected, atol=1e-6)
    assert float(rows[15]["train"]) == pytest.approx(1 / 12, abs=1e-6)  # the one truncated text sits at 16
