"""The profile of a set of texts as one model sees them: per text its length, token count, unknown-token rate,
truncation, prediction features, and its pooled embedding. Register stores the test split's profile with every
version (``reference_profile/``: profile.json + embeddings.npy, covered by the version's sha256 tags); the monitor
computes the same profile on a batch, with the same code and the verified model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.monitoring import ner
from finetune.monitoring.order import FEATURE as ORDER_FEATURE
from finetune.monitoring.order import bigram_seen_rates, reference_bigrams
from finetune.monitoring.tasks import task_of

PROFILE_FOLDER = "reference_profile"  # its name inside the logged model: artifacts/reference_profile/
TEXT_FEATURES = ("char_length", "token_count", "unk_rate", "truncated", ORDER_FEATURE)
BATCH = 64


@dataclass
class Encoder:
    """A sequence classifier and its tokenizer, as the registered pyfunc runs them."""
    model: Any
    tokenizer: Any
    max_length: int
    labels: list[str]
    task: str = "single_label"
    thresholds: list[float] | None = None  # multi-label: the model's per-label decision thresholds


@dataclass
class Profile:
    features: dict[str, np.ndarray]  # TEXT_FEATURES + the task's prediction features, one value per text
    probs: np.ndarray
    embeddings: np.ndarray  # float16, one pooled embedding per text
    labels: np.ndarray | None  # label ids when the texts came labelled
    bigram_table: np.ndarray | None = None  # the reference's: packed bits of its word bigrams (order.py)

    def __len__(self) -> int:
        return len(self.probs)


def encoder_from_folder(model_dir: str | Path, max_length: int, task: str = "single_label") -> Encoder:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    auto = AutoModelForTokenClassification if task == "token" else AutoModelForSequenceClassification
    model = auto.from_pretrained(str(model_dir), local_files_only=True,
                                                               use_safetensors=True).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    thresholds = None
    if task == "multi_label":
        from finetune.tasks.multi_label import read_thresholds

        thresholds = [float(t) for t in read_thresholds(model_dir, labels)]
    return Encoder(model, tok, max_length, labels, task, thresholds)


def encoder_from_pyfunc(pyfunc: Any, task: str = "single_label") -> Encoder:
    """The classifier inside a loaded (verified) fp32 pyfunc; the int8 ONNX variant has no embeddings to offer."""
    inner = pyfunc.unwrap_python_model()
    if not hasattr(inner, "model") or not hasattr(inner, "tokenizer"):
        raise TypeError("the monitor needs the fp32 PyTorch model version (not the int8 variant): it profiles the "
                        "model's pooled embeddings")
    thresholds = list(inner.thresholds) if task == "multi_label" else None
    return Encoder(inner.model, inner.tokenizer, int(inner.max_length), list(inner.labels), task, thresholds)


def text_features(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Character length, token count before truncation, share of unknown tokens, and whether it was truncated."""
    ids = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    unk = tokenizer.unk_token_id
    special = len(tokenizer("", add_special_tokens=True)["input_ids"])  # [CLS] and [SEP] of BERT, etc.
    counts = np.array([len(x) for x in ids], dtype=np.float64)
    unks = np.array([sum(1 for t in x if t == unk) for x in ids], dtype=np.float64)
    return {"char_length": np.array([len(t) for t in texts], dtype=np.float64), "token_count": counts,
            "unk_rate": unks / np.maximum(counts - special, 1), "truncated": (counts > max_length).astype(np.float64)}


def forward(encoder: Encoder, texts: list[str], tagged: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, mean-pooled last hidden states) of ``texts``, in batches of similar length; NER: tag
    probabilities per word (``tagged``: the texts are tagged tokens joined by spaces; monitoring/ner.py)."""
    import torch

    if encoder.task == "token":
        return ner.tag_forward(encoder.model, encoder.tokenizer, encoder.max_length, ner.word_lists(texts, tagged),
                               BATCH)

    order = np.argsort([len(t) for t in texts], kind="stable")
    probs = np.zeros((len(texts), len(encoder.labels)), dtype=np.float32)
    emb = None
    with torch.no_grad():
        for start in range(0, len(texts), BATCH):
            idx = order[start:start + BATCH]
            enc = encoder.tokenizer([texts[i] for i in idx], truncation=True, padding=True,
                                    max_length=encoder.max_length, return_tensors="pt")
            out = encoder.model(**enc, output_hidden_states=True)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            if emb is None:
                emb = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            probs[idx] = task_of(encoder.task).probabilities(out.logits.float().numpy())
            emb[idx] = pooled.float().numpy()
    return probs, (emb if emb is not None else np.zeros((0, 1), dtype=np.float32))


def profile_texts(encoder: Encoder, texts: list[str], label_ids: np.ndarray | None = None,
                  bigram_table: np.ndarray | None = None) -> Profile:
    """The batch's profile; with the reference's ``bigram_table`` also each text's bigram seen rate."""
    task = task_of(encoder.task)
    probs, emb = forward(encoder, texts, tagged=label_ids is not None)
    features = {**text_features(encoder.tokenizer, texts, encoder.max_length), **task.prediction_features(probs)}
    if bigram_table is not None:
        features[ORDER_FEATURE] = bigram_seen_rates(texts, bigram_table)
    return Profile(features, probs, emb.astype(np.float16), label_ids)


def save_reference(profile: Profile, encoder: Encoder, folder: str | Path, metrics: dict[str, Any]) -> Path:
    """``folder``/profile.json (per-text features, label and prediction counts, the test metrics),
    embeddings.npy (float16) and bigrams.npy (the packed bigram table, 128 KiB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = task_of(encoder.task)
    k = len(encoder.labels)
    predicted = task.predicted(profile.probs, encoder.thresholds)
    doc = {"task": encoder.task, "labels": encoder.labels, "n": len(profile), "max_length": encoder.max_length,
           "features": {name: np.round(v, 6).tolist() for name, v in profile.features.items()},
           "predicted_counts": task.counts(predicted, k).tolist(),
           "label_counts": task.counts(profile.labels, k).tolist() if profile.labels is not None else None,
           "thresholds": encoder.thresholds, "metrics": metrics}
    if encoder.task == "multi_label":  # texts by how many labels they were given
        doc["predicted_set_sizes"] = np.bincount(predicted.sum(1), minlength=k + 1).tolist()
    if encoder.task == "token":  # per type: texts holding it, entities per text; entities per text
        doc["predicted_entities"] = ner.entity_summary(predicted, encoder.labels)
        doc["true_entities"] = ner.entity_summary(profile.labels, encoder.labels) if profile.labels is not None else None
    (folder / "profile.json").write_text(json.dumps(doc), encoding="utf-8")  # a temporary folder: logged whole
    with open(folder / "embeddings.npy", "wb") as fh:
        np.save(fh, profile.embeddings.astype(np.float16))
    if profile.bigram_table is not None:
        with open(folder / "bigrams.npy", "wb") as fh:
            np.save(fh, profile.bigram_table)
    return folder


def load_reference(folder: str | Path) -> tuple[dict[str, Any], np.ndarray]:
    folder = Path(folder)
    doc = json.loads((folder / "profile.json").read_text(encoding="utf-8"))
    doc["features"] = {k: np.asarray(v, dtype=np.float64) for k, v in doc["features"].items()}
    # a version registered before the order feature has no table: its batches are profiled without it
    doc["bigram_table"] = np.load(folder / "bigrams.npy") if (folder / "bigrams.npy").is_file() else None
    return doc, np.load(folder / "embeddings.npy").astype(np.float32)


def reference_profile(model_dir: str | Path, texts: list[str], labels: list[str], max_length: int, rows: int,
                      folder: str | Path, seed: int = 0, task_name: str = "single_label") -> Path:
    """The reference profile of ``model_dir`` on (a sample of at most ``rows`` of) its test split, saved in
    ``folder``; its test metrics are measured on the same rows."""
    from finetune.tasks.multi_label import JOIN  # how the splits join a row's labels

    encoder = encoder_from_folder(model_dir, max_length, task_name)
    task = task_of(encoder.task)
    keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:rows])
    texts = [texts[i] for i in keep]
    ids = task.label_ids([labels[i] for i in keep], encoder.labels, "test split", [int(i) for i in keep], JOIN)
    profile = profile_texts(encoder, texts, ids)
    profile.features[ORDER_FEATURE], profile.bigram_table = reference_bigrams(texts)
    metrics = task.score(ids, profile.probs, encoder.labels, encoder.thresholds)
    return save_reference(profile, encoder, folder, metrics)
