"""The MLflow pyfunc flavour of a compressed (ONNX) classifier, logged as "model from code".

Serving it needs mlflow, onnxruntime and tokenizers only: no torch, no transformers, no finetune package
(MLflow stores this file's source with the model; keep it self-contained). Same contract as
pyfunc_model.TextClassifier. The artifact "model" is the compress stage's folder (ONNX files, tokenizer.json,
config.json); model_config names the ONNX file to run (``onnx_file``) and its ``onnx_sha256``, checked before
the file is handed to ONNX Runtime.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class OnnxTextClassifier(PythonModel):
    """Input: a list of texts. Output: one predicted label per text, or with ``params={"probabilities": True}``
    one record per text: ``{"label": ..., "probabilities": {label: p, ...}}``."""

    batch_size = 64

    def load_context(self, context):
        import json
        import os

        import onnxruntime as ort
        from tokenizers import Tokenizer

        conf = context.model_config or {}
        folder = context.artifacts["model"]
        onnx_path = os.path.join(folder, conf.get("onnx_file", "model.int8.onnx"))
        if not conf.get("onnx_sha256"):
            raise RuntimeError("model_config has no onnx_sha256: refusing to load an unverifiable ONNX file")
        self._check_sha256(onnx_path, conf["onnx_sha256"])
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            id2label = json.load(fh)["id2label"]
        self.labels = [id2label[str(i)] for i in range(len(id2label))]
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tokenizer.enable_truncation(int(conf.get("max_length", 512)))
        self.tokenizer.enable_padding(pad_id=int(conf.get("pad_token_id", 0)), pad_token=conf.get("pad_token", "[PAD]"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(conf.get("threads", 0))
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])

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

    def predict_proba(self, texts: list[str]):
        import numpy as np

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer.encode_batch([str(t) for t in texts[i:i + self.batch_size]])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            logits = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0].astype(np.float64)
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            out.append(z / z.sum(axis=1, keepdims=True))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))

    # `-> list`: list[str] by default, list[dict] with probabilities (MLflow logs the output schema as "any")
    def predict(self, context, model_input: list[str], params: dict | None = None) -> list:
        probs = self.predict_proba(model_input)
        if (params or {}).get("probabilities"):
            return [{"label": self.labels[int(row.argmax())],
                     "probabilities": {lab: float(p) for lab, p in zip(self.labels, row)}} for row in probs]
        return [self.labels[int(i)] for i in probs.argmax(axis=1)]


mlflow.models.set_model(OnnxTextClassifier())
