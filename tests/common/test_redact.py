"""redact_uri / redact_text: what counts as a credential in a URI."""

import pytest

from finetune.common.redact import redact_text, redact_uri, redact_values


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
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_text_and_values():
    line = "cannot reach http://bob:hunter2@mlflow:5000/api (retrying), data at s3://b/k?token=abc."
    assert redact_text(line) == "cannot reach http://***@mlflow:5000/api (retrying), data at s3://b/k?token=***."
    assert redact_values({"a": "http://u:p@h", "n": 3}) == {"a": "http://***@h", "n": 3}
