"""The MLflow pyfunc flavour of a fine-tuned classifier, logged as "model from code".

MLflow stores this file's source with every model version, so loading ``models:/<name>@champion``
needs only mlflow, torch and transformers, not this package, and unpickles nothing: weights come from
safetensors. Keep it self-contained: no imports from the finetune package.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TextClassifier(PythonModel):
    """Input: a list of texts. Output: one predicted label per text, or with ``params={"probabilities": True}``
    one record per text: ``{"label": ..., "probabilities": {label: p, ...}}``."""

    batch_size = 64

    def load_context(self, context):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts["model"]
        self._check_weights(path, (context.model_config or {}).get("weights_sha256") or {})
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, use_safetensors=True).eval()
        cfg = self.model.config
        self.labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
        self.max_length = int(context.model_config.get("max_length", 512)) if context.model_config else 512

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

    def predict_proba(self, texts: list[str]):
        torch = self.torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i:i + self.batch_size]), truncation=True, padding=True,
                                     max_length=self.max_length, return_tensors="pt")
                out.append(torch.softmax(self.model(**enc).logits.float(), dim=-1))
        return torch.cat(out).numpy() if out else torch.zeros((0, len(self.labels))).numpy()

    # `-> list`: list[str] by default, list[dict] with probabilities (MLflow logs the output schema as "any")
    def predict(self, context, model_input: list[str], params: dict | None = None) -> list:
        probs = self.predict_proba(model_input)
        if (params or {}).get("probabilities"):
            return [{"label": self.labels[int(row.argmax())],
                     "probabilities": {lab: float(p) for lab, p in zip(self.labels, row)}} for row in probs]
        return [self.labels[int(i)] for i in probs.argmax(axis=1)]


mlflow.models.set_model(TextClassifier())
