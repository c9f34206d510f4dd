"""`finetune serve` of a token (NER) model, fp32 and int8, on 127.0.0.1: v1 answers entity records, v2 an
``entities`` output of JSON per text; requests batched into one model call keep their own entities."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TRICKY, Server, get, post, v2_body
from conftest import ner_expected as expected
from conftest import ner_spans as spans


def model_calls(metrics: str) -> int:
    return int(float(re.search(r"^finetune_serve_batch_size_count (\S+)$", metrics, re.MULTILINE).group(1)))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_serve_answers_entities_with_offsets_in_both_protocols(ner_pyfunc_dirs, tmp_path, variant):
    folder = ner_pyfunc_dirs[variant]
    texts = [t for t, _ in TRICKY]
    server = Server(tmp_path, str(folder), "--set", "serve.batch_window_ms=500").wait_ready()
    try:
        status, _, out = post(f"{server.base}/v1/models/{variant}:predict", {"instances": texts})
        assert status == 200, out
        assert [spans(r) for r in out["predictions"]] == [expected(t, e) for t, e in TRICKY]

        status, _, out = post(f"{server.base}/v2/models/{variant}/infer", {**v2_body(texts), "id": "r1"})
        assert status == 200 and out["id"] == "r1", out
        entities, windows = out["outputs"]
        assert entities["name"] == "entities" and entities["datatype"] == "BYTES" and entities["shape"] == [6]
        got = [[(e["text"], e["type"], e["start"], e["end"]) for e in json.loads(d)] for d in entities["data"]]
        assert got == [expected(t, e) for t, e in TRICKY]
        assert windows["name"] == "windows" and windows["data"][4] == 0 and windows["data"][5] > 1

        # one text per request, sent together: the batcher joins them in model calls, each keeps its own answer
        before = model_calls(get(server.base + "/metrics")[1])
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(lambda t: post(f"{server.base}/v1/models/{variant}:predict",
                                                   {"instances": [t]}), texts))
        assert [spans(a[2]["predictions"][0]) for a in answers] == [expected(t, e) for t, e in TRICKY]
        metrics = get(server.base + "/metrics")[1]
        assert model_calls(metrics) - before < len(texts)  # at least two requests shared a call
        assert re.search(r'^finetune_serve_predicted_label_total\{label="PER"\} (\d+)', metrics, re.MULTILINE)
        status, meta = get(f"{server.base}/v2/models/{variant}")
        assert [o["name"] for o in meta["outputs"]] == ["entities", "windows"]
    finally:
        assert server.stop() == 0
