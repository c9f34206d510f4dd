"""The server's parts without a server: request parsing and bounds, batching, the request log, the token file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from finetune.serving import protocol
from finetune.serving.batching import Batcher
from finetune.serving.protocol import Limits, Refusal
from finetune.serving.request_log import RequestLog
from finetune.stages import StageFailed
from finetune.stages.serve import read_token

LIMITS = Limits(max_texts=3, max_chars=10)


@pytest.mark.parametrize("body, status, words", [
    (b'{"instances": ["a"', 400, "not valid JSON"),
    (b'\xff\xfe', 400, "not valid JSON"),
    (b'{"instances": ["a", 3]}', 400, "instances[1] is int, not a string"),
    (b'{"instances": [null]}', 400, "instances[0] is NoneType, not a string"),
    (b'{"instances": []}', 400, "non-empty list of strings"),
    (b'{"instances": "a"}', 400, "non-empty list of strings"),
    (b'["a"]', 400, '{"instances": ["text", ...]}'),
    (b'{"instances": ["a", "b", "c", "d"]}', 413, "holds 4 texts; at most 3 per request"),
    (b'{"instances": ["a", "01234567890"]}', 413, "instances[1] has 11 characters; at most 10"),
])
def test_v1_refusals_name_the_item_and_the_limit(body, status, words):
    with pytest.raises(Refusal) as exc:
        protocol.v1_texts(protocol.parse_json(body), LIMITS)
    assert exc.value.status == status and words in exc.value.message, exc.value.message


@pytest.mark.parametrize("payload, words", [
    ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "datatype BYTES"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, "shape [2] does not match"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [7]}]}, "data[0] is int"),
    ({"inputs": []}, "(one input)"),
    ({"instances": ["a"]}, "v2 requests are"),
])
def test_v2_refusals(payload, words):
    with pytest.raises(Refusal) as exc:
        protocol.v2_texts(payload, LIMITS)
    assert exc.value.status == 400 and words in exc.value.message, exc.value.message


def test_both_formats_give_labels_and_probabilities():
    assert protocol.v1_texts({"instances": [{"text": "a"}, "b"]}, LIMITS) == ["a", "b"]
    texts, req_id = protocol.v2_texts({"id": "r1", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2],
                                                               "data": ["a", "b"]}]}, LIMITS)
    assert texts == ["a", "b"] and req_id == "r1"
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    out = protocol.v2_response("m", "3", ["fresh", "rotten"], probs, req_id)
    assert out["outputs"][0]["data"] == ["rotten", "fresh"] and out["outputs"][1]["shape"] == [2, 2]
    assert out["outputs"][1]["parameters"]["labels"] == ["fresh", "rotten"] and out["id"] == "r1"
    assert protocol.v1_response(["fresh", "rotten"], probs)["predictions"][0] == {
        "label": "rotten", "probabilities": {"fresh": 0.2, "rotten": 0.8}}


class _Recorder:
    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, texts):
        self.calls.append(list(texts))
        if self.fail_on in texts:
            raise RuntimeError("model broke")
        return np.array([[len(t), 1.0] for t in texts])


async def _submit_all(batcher: Batcher, requests: list[list[str]]):
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
    finally:
        await batcher.stop()


def test_requests_within_the_window_share_a_call_up_to_the_max_size():
    model, sizes = _Recorder(), []
    requests = [["a"], ["bb", "cc"], ["ddd"], ["e", "f", "g"], ["h"]]
    out = asyncio.run(_submit_all(Batcher(model, 4, 200, sizes.append), requests))
    # each caller gets its own rows, in its order
    assert [[int(r[0]) for r in rows] for rows in out] == [[len(t) for t in r] for r in requests]
    assert model.calls == [["a", "bb", "cc", "ddd"], ["e", "f", "g", "h"]] and sizes == [4, 4]


def test_window_zero_is_one_call_per_request():
    model = _Recorder()
    asyncio.run(_submit_all(Batcher(model, 64, 0), [["a"], ["b", "c"], ["d"]]))
    assert model.calls == [["a"], ["b", "c"], ["d"]]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_is_served():
    model = _Recorder(fail_on="boom")

    async def scenario():
        batcher = Batcher(model, 2, 50)
        await batcher.start()
        first = await asyncio.gather(batcher.submit(["boom"]), batcher.submit(["x"]), return_exceptions=True)
        second = await batcher.submit(["fine"])
        await batcher.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in first) and second[0][0] == 4


def test_request_log_keeps_hashes_or_nothing_of_the_text(tmp_path):
    text = "a private review"
    preds = [{"label": "fresh", "probabilities": {"fresh": 0.9, "rotten": 0.1}}]
    for mode, key in (("sha256", "text_sha256"), ("drop", None), ("keep", "text")):
        rlog = RequestLog(tmp_path / mode, 1.0, mode, flush_records=2)
        assert rlog.sampled() and rlog.add("toy", "1", [text], preds) is False  # not due: 1 record of 2
        assert rlog.add("toy", "1", [text], preds) is True
        path = Path(rlog.flush())  # where it was written (a local path here)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 2 and records[0]["label"] == "fresh" and records[0]["version"] == "1"
        raw = path.read_text()
        if mode == "sha256":
            assert records[0][key] == hashlib.sha256(text.encode()).hexdigest() and text not in raw
        elif mode == "drop":
            assert text not in raw and "text" not in records[0] and "text_sha256" not in records[0]
        else:
            assert records[0][key] == text
        assert rlog.flush() is None and list(path.parent.iterdir()) == [path]  # no temporary file left


def test_request_log_samples_at_its_rate(tmp_path):
    rlog = RequestLog(tmp_path, 0.25, "drop", 100, rng=random.Random(0))
    share = sum(rlog.sampled() for _ in range(4000)) / 4000
    assert 0.22 < share < 0.28
    off = RequestLog(tmp_path / "off", 0.0, "drop", 100)
    assert not off.sampled() and not (tmp_path / "off").exists()


def test_token_file_is_read_and_bad_files_are_one_line_without_the_content(tmp_path, monkeypatch):
    good = tmp_path / "token"
    good.write_text("s3cr3t-token\n")
    assert read_token(str(good)) == "s3cr3t-token"
    monkeypatch.setenv("FINETUNE_SERVE_TOKEN_FILE", str(good))
    assert read_token(None) == "s3cr3t-token"
    monkeypatch.delenv("FINETUNE_SERVE_TOKEN_FILE")
    assert read_token(None) is None
    bad = tmp_path / "bad"
    bad.write_text("two words")
    with pytest.raises(StageFailed, match=f"^{bad}: the bearer token file must hold one token") as exc:
        read_token(str(bad))
    assert "two words" not in str(exc.value)
    with pytest.raises(StageFailed, match="cannot read the bearer token file"):
        read_token(str(tmp_path / "missing"))


def test_two_workers_answer_two_batches_at_once_each_caller_its_rows():
    """serve.model_workers=2: while one batch runs, the next is collected and run beside it (both calls are in
    the model at the same time), and every caller still gets its own rows."""
    import threading

    both_in = threading.Barrier(2, timeout=10)  # passes only if two model calls overlap
    calls = []

    def model(texts):
        calls.append(list(texts))
        both_in.wait()
        return np.array([[len(t), 1.0] for t in texts])

    requests = [["a"], ["bb"], ["ccc"], ["dddd"]]
    out = asyncio.run(_submit_all(Batcher(model, 2, 50, workers=2), requests))
    assert [[int(r[0]) for r in rows] for rows in out] == [[1], [2], [3], [4]]
    assert sorted(map(len, calls)) == [2, 2]


def test_served_model_calls_length_sorted_chunks_and_answers_in_request_order():
    from finetune.serving import model as served

    class Impl:
        def __init__(self):
            self.calls = []

        def predict_proba(self, texts):
            self.calls.append(list(texts))
            return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    impl = Impl()
    texts = ["x" * n for n in (9, 1, 12, 3, 7, 2, 11, 5, 8, 4, 10, 6)]
    probs = served.ServedModel("m", "1", "fp32", ["a", "b"], impl).predict_proba(texts)
    assert np.allclose(probs[:, 0] * (np.array([len(t) for t in texts]) + 1), [len(t) for t in texts])
    assert [len(c) for c in impl.calls] == [served.SORTED_CHUNK, len(texts) - served.SORTED_CHUNK]
    assert [len(t) for c in impl.calls for t in c] == sorted(len(t) for t in texts)
