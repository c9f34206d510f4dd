"""redact_uri / redact_text: what counts as a credential in a URI."""

import pytest

from finetune.common.redact import redact_text, redact_tree, redact_uri, redact_values


@pytest.mark.parametrize("uri, expected", [
    ("http://alice:pw@127.0.0.1:5057", "http://***@127.0.0.1:5057"),
    ("https://token@mlflow.example.com/path?x=1", "https://***@mlflow.example.com/path?x=1"),
    ("s3://bucket/key.csv?X-Amz-Credential=AKIA&X-Amz-Signature=abc&v=2",
     "s3://bucket/key.csv?X-Amz-Credential=***&X-Amz-Signature=***&v=2"),
    ("https://h/p?access_token=t1&api_key=k&client_secret=s&password=p&sig=x&page=3",
     "https://h/p?access_token=***&api_key=***&client_secret=***&password=***&sig=***&page=3"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("models:/name@champion", "models:/name@champion"),
    # a URI inside a query value (DVC's repo=), plain or percent-encoded, and every X-Amz-* value
    ("dvc://data/raw.csv?repo=https://bob:ghp_tok@github.com/o/r.git&rev=main",
     "dvc://data/raw.csv?repo=https://***@github.com/o/r.git&rev=main"),
    ("dvc://data/raw.csv?repo=https%3A%2F%2Fbob%3Aghp_tok%40github.com%2Fo%2Fr&rev=v1",
     "dvc://data/raw.csv?repo=https%3A%2F%2F***%40github.com%2Fo%2Fr&rev=v1"),
    ("dvc://d.csv?repo=https://h/r?x=1%26access_token%3Dt9",
     "dvc://d.csv?repo=https%3A%2F%2Fh%2Fr%3Fx%3D1%26access_token%3D***"),
    (("https://b.s3.amazonaws.com/k.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261204&"
      "X-Amz-Security-Token=IQo&X-Amz-Signature=9f&x-id=GetObject"),
     ("https://b.s3.amazonaws.com/k.csv?X-Amz-Algorithm=***&X-Amz-Credential=***&X-Amz-Security-Token=***&"
      "X-Amz-Signature=***&x-id=GetObject")),
    ("dvc://data/raw.csv?repo=git@github.com:o/r.git&rev=main", "dvc://data/raw.csv?repo=git@github.com:o/r.git&rev=main"),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_text_and_values():
    line = "cannot reach http://bob:hunter2@mlflow:5000/api (retrying), data at s3://b/k?token=abc."
    assert redact_text(line) == "cannot reach http://***@mlflow:5000/api (retrying), data at s3://b/k?token=***."
    assert redact_values({"a": "http://u:p@h", "n": 3}) == {"a": "http://***@h", "n": 3}


def test_redact_tree_reaches_nested_params():
    params = {"data": {"path": "dvc://d.csv?repo=https://u:tok@git.example/r", "label_column": "label"},
              "tune": {"space": {"train.lr": {"low": 1e-5}}}, "list": ["s3://b/k?X-Amz-Signature=zz", 3]}
    assert redact_tree(params) == {"data": {"path": "dvc://d.csv?repo=https://***@git.example/r",
                                            "label_column": "label"},
                                   "tune": {"space": {"train.lr": {"low": 1e-5}}},
                                   "list": ["s3://b/k?X-Amz-Signature=***", 3]}
