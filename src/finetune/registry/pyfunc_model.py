"""The MLflow pyfunc flavour of a fine-tuned classifier, logged as "model from code".

MLflow stores this file's source with every model version, so loading ``models:/<name>@champion``
needs only mlflow, torch and transformers, not this package, and unpickles nothing: weights come from
safetensors. Keep it self-contained: no imports from the finetune package.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

# Request bounds (model_config max_texts / max_text_chars override them): ~1,000 texts take seconds on a CPU, far
# below a gateway's 60 s; 20,000 characters is far more than max_length tokens.
MAX_TEXTS = 1000


MAX_TEXT_CHARS = 20000


class TextClassifier(PythonModel):
    """Input: a list of texts. Output: one predicted label per text, or with ``params={"probabilities": True}``
    one record per text: ``{"label": ..., "probabilities": {label: p, ...}}``. A multi-label model gives a list
    of labels per text (``"labels"`` in the records) and each label's own probability. A token-classification
    (NER) model gives one record per text, whatever the params: ``{"entities": [{text, type, start, end, score}],
    "windows": n}``, offsets into the text as given (ner_decode.py, logged beside this file)."""

    batch_size = 64

    def load_context(self, context):
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
            AutoTokenizer,
        )

        path = context.artifacts["model"]
        conf = context.model_config or {}
        if conf.get("files_sha256"):
            self._check_files(path, conf["files_sha256"])
        else:  # a version logged before every file's digest was recorded: its weights at least
            self._check_weights(path, conf.get("weights_sha256") or {})
        self.max_texts = int(conf.get("max_texts", MAX_TEXTS))
        self.max_text_chars = int(conf.get("max_text_chars", MAX_TEXT_CHARS))
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        architectures = AutoConfig.from_pretrained(path, local_files_only=True).architectures or []
        self.token_level = any(a.endswith("ForTokenClassification") for a in architectures)
        auto = AutoModelForTokenClassification if self.token_level else AutoModelForSequenceClassification
        self.model = auto.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        cfg = self.model.config
        self.labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
        self._read_decision(path, getattr(cfg, "problem_type", None))
        self.max_length = int(context.model_config.get("max_length", 512)) if context.model_config else 512
        if self.token_level:
            import ner_decode  # logged beside this file (code_paths): words, windows, entities with offsets

            self.ner = ner_decode
            self.windowed = ner_decode.window_tokenizer(self.tokenizer.backend_tokenizer, self.max_length)

    @staticmethod
    def _check_weights(path: str, expected: dict) -> None:
        """Refuse weights that differ from what was registered (tampered or corrupt artifact store)."""
        import hashlib
        import os

        for name, digest in expected.items():
            h = hashlib.sha256()
            with open(os.path.join(path, name), "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != digest:
                raise RuntimeError(f"model weights {name} do not match the registered sha256 {digest}: "
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
        torch = self.torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), truncation=True, padding=True,
                                     max_length=self.max_length, return_tensors="pt")
                logits = self.model(**enc).logits.float()
                out.append(torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1))
        return torch.cat(out).numpy() if out else torch.zeros((0, len(self.labels))).numpy()

    def predict_records(self, texts: list[str]) -> list[dict]:
        """Token models: ``{"entities", "windows"}`` per text; the windows of all texts run in length-sorted
        model calls of 32 windows (ner_decode.decode_many)."""
        torch = self.torch

        def logits(batch):
            with torch.no_grad():
                return self.model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()

        pad_id = int(self.tokenizer.pad_token_id or 0)
        return self.ner.decode_many([str(t) for t in texts], self.windowed, logits, self.labels, pad_id)

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


mlflow.models.set_model(TextClassifier())
