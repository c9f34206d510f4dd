"""The MLflow pyfunc flavour of a compressed (ONNX) classifier, logged as "model from code".

Serving it needs mlflow, onnxruntime and tokenizers only: no torch, no transformers, no finetune package
(MLflow stores this file's source with the model; keep it self-contained). Same contract as
pyfunc_model.TextClassifier. The session is the one compress measured: row_parallel.py, logged beside this file
(model_config ``threads``; 0 = the CPUs available). The artifact "model" is the compress stage's folder (ONNX files, tokenizer.json,
config.json); model_config names the ONNX file to run (``onnx_file``) and its ``onnx_sha256``, checked before
the file is handed to ONNX Runtime.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

# Request bounds (model_config max_texts / max_text_chars override them): ~1,000 texts take seconds on a CPU, far
# below a gateway's 60 s; 20,000 characters is far more than max_length tokens.
MAX_TEXTS = 1000


MAX_TEXT_CHARS = 20000


class OnnxTextClassifier(PythonModel):
    """Input: a list of texts. Output: one predicted label per text, or with ``params={"probabilities": True}``
    one record per text: ``{"label": ..., "probabilities": {label: p, ...}}``. A multi-label model gives a list
    of labels per text (``"labels"`` in the records) and each label's own probability. A token-classification
    (NER) model gives one record per text, whatever the params: ``{"entities": [{text, type, start, end, score}],
    "windows": n}``, offsets into the text as given (ner_decode.py, logged beside this file)."""

    batch_size = 64

    def load_context(self, context):
        import json
        import os

        import row_parallel  # logged beside this file (code_paths): the session compress measured
        from tokenizers import Tokenizer

        conf = context.model_config or {}
        folder = context.artifacts["model"]
        onnx_path = os.path.join(folder, conf.get("onnx_file", "model.int8.onnx"))
        if not conf.get("onnx_sha256"):
            raise RuntimeError("model_config has no onnx_sha256: refusing to load an unverifiable ONNX file")
        self._check_sha256(onnx_path, conf["onnx_sha256"])
        if conf.get("files_sha256"):  # every file (config.json's labels, tokenizer.json), not only the ONNX one
            self._check_files(folder, conf["files_sha256"])
        self.max_texts = int(conf.get("max_texts", MAX_TEXTS))
        self.max_text_chars = int(conf.get("max_text_chars", MAX_TEXT_CHARS))
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
        id2label = config["id2label"]
        self.labels = [id2label[str(i)] for i in range(len(id2label))]
        self._read_decision(folder, config.get("problem_type"))
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tokenizer.enable_truncation(int(conf.get("max_length", 512)))
        self.tokenizer.enable_padding(pad_id=int(conf.get("pad_token_id", 0)), pad_token=conf.get("pad_token", "[PAD]"))
        self.run_logits = row_parallel.RowParallelSession(onnx_path, int(conf.get("threads", 0)))
        self.token_level = any(a.endswith("ForTokenClassification") for a in config.get("architectures") or [])
        if self.token_level:
            import ner_decode  # logged beside this file (code_paths): words, windows, entities with offsets

            self.ner = ner_decode
            self.pad_id = int(conf.get("pad_token_id", 0))
            self.windowed = ner_decode.window_tokenizer(self.tokenizer, int(conf.get("max_length", 512)))

    @staticmethod
    def _check_sha256(path: str, expected: str) -> None:
        """Refuse an ONNX file that differs from what was logged (tampered or corrupt artifact store)."""
        import hashlib

        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != expected:
            raise RuntimeError(f"ONNX model {path} does not match the registered sha256 {expected}: "
                               f"refusing to load a modified artifact")

    @staticmethod
    def _check_files(folder: str, expected: dict) -> None:
        """Refuse the artifact folder unless its files are exactly those logged (same names, same sha256): a changed
        config.json (swapped labels), tokenizer or weights, an extra or missing file, a symlink. The digests travel
        in MLmodel's model_config, so this catches a partial change of the store, not a rewritten MLmodel or code
        file: only `finetune predict` checks against the registry (docs/serving.md)."""
        import hashlib
        import os

        found = {}
        for top, dirs, files in os.walk(folder):
            for name in dirs + files:
                full = os.path.join(top, name)
                rel = os.path.relpath(full, folder).replace(os.sep, "/")
                if os.path.islink(full):
                    raise RuntimeError(f"model file {rel} is a symbolic link: refusing to load a modified artifact")
                if name in files:
                    h = hashlib.sha256()
                    with open(full, "rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 20), b""):
                            h.update(chunk)
                    found[rel] = h.hexdigest()
        for rel in sorted(set(found) | set(expected)):
            if found.get(rel) != expected.get(rel):
                how = "is missing" if rel not in found else "was not logged" if rel not in expected else "differs"
                raise RuntimeError(f"model file {rel} {how}: the files do not match the registered sha256 digests "
                                   f"(recorded at log time); refusing to load a modified artifact")

    def _check_request(self, texts) -> None:
        """Bound one request: a server answers a too-large one at once with HTTP 400 instead of computing past a
        gateway's timeout. MlflowException(INVALID_PARAMETER_VALUE) is what `mlflow models serve` maps to 400."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        if len(texts) > self.max_texts:
            raise MlflowException(f"{len(texts)} texts in one request: at most {self.max_texts}; split the request",
                                  error_code=INVALID_PARAMETER_VALUE)
        long = [i for i, t in enumerate(texts) if len(str(t)) > self.max_text_chars]
        if long:
            raise MlflowException(f"text(s) {long[:5]} longer than {self.max_text_chars} characters: shorten them "
                                  f"(the model reads at most max_length tokens anyway)",
                                  error_code=INVALID_PARAMETER_VALUE)

    def predict_proba(self, texts: list[str]):
        import numpy as np

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer.encode_batch([str(t) for t in texts[i:i + self.batch_size]])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            logits = self.run_logits({"input_ids": ids, "attention_mask": mask}).astype(np.float64)
            if self.multi_label:
                out.append(1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60))))
                continue
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            out.append(z / z.sum(axis=1, keepdims=True))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))

    def predict_records(self, texts: list[str]) -> list[dict]:
        """Token models: ``{"entities", "windows"}`` per text; the windows of all texts run in length-sorted
        session runs of 32 windows (ner_decode.decode_many)."""
        return self.ner.decode_many([str(t) for t in texts], self.windowed, self.run_logits, self.labels,
                                    self.pad_id)

    # `-> list`: list[str] by default, list[dict] with probabilities (MLflow logs the output schema as "any")
    def predict(self, context, model_input: list[str], params: dict | None = None) -> list:
        self._check_request(model_input)
        if self.token_level:
            return self.predict_records(model_input)
        return self._decide(self.predict_proba(model_input), bool((params or {}).get("probabilities")))

    def _read_decision(self, folder: str, problem_type) -> None:
        """Multi-label models (config problem_type) decide per label: sigmoid, then the thresholds stored with the
        model (thresholds.json, tuned on the validation split; 0.5 without it). Others: softmax, argmax."""
        import json
        import os

        self.multi_label = problem_type == "multi_label_classification"
        self.thresholds = [0.5] * len(self.labels)
        path = os.path.join(folder, "thresholds.json")
        if self.multi_label and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                stored = json.load(fh)
            if stored.get("labels") != self.labels:
                raise RuntimeError(f"thresholds.json is for labels {stored.get('labels')}, the model has {self.labels}")
            self.thresholds = [float(t) for t in stored["thresholds"]]

    def _decide(self, probs, probabilities: bool) -> list:
        """Single-label: the argmax label. Multi-label: the labels at or over their thresholds (maybe none)."""
        if not self.multi_label:
            chosen = [self.labels[int(row.argmax())] for row in probs]
            key = "label"
        else:
            chosen = [[lab for lab, p, t in zip(self.labels, row, self.thresholds) if p >= t] for row in probs]
            key = "labels"
        if probabilities:
            return [{key: c, "probabilities": {lab: float(p) for lab, p in zip(self.labels, row)}}
                    for c, row in zip(chosen, probs)]
        return chosen


mlflow.models.set_model(OnnxTextClassifier())
