"""NER (``task: token``) in the monitor: each text's words tagged through the decoding predict and serving use
(tasks/ner_decode.py: words, windows of max_length sub-tokens, each word's tag read at its first sub-token in the
window with the most context), the entities of its argmax tags, and each text's mean-pooled last hidden state
over its windows (one model call gives both)."""

from __future__ import annotations

from typing import Any

import numpy as np

from finetune.tasks import ner_decode
from finetune.tasks.ner_align import IGNORE

COUNT_BINS = 6  # entities per text: 0, 1, ..., 4, and 5 or more


def word_lists(texts: list[str], tagged: bool) -> list[list[str]]:
    """Each text's words: tagged data (validate's splits, a labelled batch) holds its tokens joined by single
    spaces, so its tags stay aligned; a raw text is cut into words as predict cuts it."""
    if tagged:
        return [t.split(" ") for t in texts]
    return [[t[s:e] for s, e in ner_decode.word_spans(t)] for t in texts]


def _pooled_logits_fn(model: Any, pooled: list[np.ndarray]):
    """decode's ``logits_fn``, which also keeps each call's mean-pooled last hidden states in ``pooled``."""
    import torch

    def logits_fn(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, output_hidden_states=True)
        mask = torch.from_numpy(batch["attention_mask"]).unsqueeze(-1).float()
        pooled.append(((out.hidden_states[-1] * mask).sum(1) / mask.sum(1).clamp(min=1.0)).float().numpy())
        return out.logits.float().numpy()
    return logits_fn


def tag_forward(model: Any, tokenizer: Any, max_length: int, words: list[list[str]], chunk: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tag probabilities per word, padded with all-zero rows: (texts, most words, tags); each text's embedding:
    the mean of its windows' pooled states). A word with no sub-token gets an all-zero row, as in decode."""
    tok = ner_decode.window_tokenizer(tokenizer.backend_tokenizer, max_length)
    wins = [ner_decode.text_windows(w, tok) if w else [] for w in words]
    flat = [w for ws in wins for w in ws]
    pooled: list[np.ndarray] = []
    k, hidden = model.config.num_labels, model.config.hidden_size
    win_probs = (ner_decode.window_probabilities(flat, _pooled_logits_fn(model, pooled), tokenizer.pad_token_id or 0,
                                                 chunk) if flat else [])
    win_emb = np.zeros((len(flat), hidden), dtype=np.float32)
    if flat:  # window_probabilities runs the windows in this order (by length, stable)
        win_emb[sorted(range(len(flat)), key=lambda i: len(flat[i].ids))] = np.concatenate(pooled)
    probs = np.zeros((len(words), max([len(w) for w in words] + [1]), k), dtype=np.float32)
    emb = np.zeros((len(words), hidden), dtype=np.float32)
    first = 0
    for i, (w, ws) in enumerate(zip(words, wins)):
        if ws:
            probs[i, :len(w)] = ner_decode.word_probabilities(ws, win_probs[first:first + len(ws)], len(w))
            emb[i] = win_emb[first:first + len(ws)].mean(0)
        first += len(ws)
    return probs, emb


def tag_ids(values: list[Any], labels: list[str], source: str, rows: list[int]) -> np.ndarray:
    """Each row's tag list as tag ids, padded with -100 (as tokenize stores them); a value that is not a list of
    the model's tags is another task's label."""
    index = {lab: i for i, lab in enumerate(labels)}
    lists = []
    for row, value in zip(rows, values):
        tags = value.tolist() if isinstance(value, np.ndarray) else value
        bad = [t for t in tags if str(t) not in index] if isinstance(tags, (list, tuple)) else [tags]
        if bad:
            raise ValueError(f"{source}: row {row}: label {str(bad[0])[:80]!r} is not one of the model's tags "
                             f"{labels} (a batch of another task or tag set?)")
        lists.append([index[str(t)] for t in tags])
    out = np.full((len(lists), max([len(t) for t in lists] + [1])), IGNORE, dtype=np.int64)
    for i, tags in enumerate(lists):
        out[i, :len(tags)] = tags
    return out


def _tag_strings(ids: np.ndarray, names: list[str]) -> list[list[str]]:
    return [[names[t] if t >= 0 else "O" for t in row] for row in ids]


def entity_sets(ids: np.ndarray, names: list[str]) -> list[set[tuple[str, int, int]]]:
    """Each row's entities (type, first word, last word + 1) of its tag ids (-100: no word, read as O)."""
    return [set(ner_decode.spans(tags)) for tags in _tag_strings(ids, names)]


def generic_tags(k: int) -> list[str]:
    """Tag names in tag_names' layout (O, then B-/I- per type): all entity matching needs (the type names do not
    change which spans match)."""
    return ["O"] + [f"{'B' if i % 2 else 'I'}-T{(i - 1) // 2}" for i in range(1, k)]


def entity_types(names: list[str]) -> list[str]:
    return sorted({n[2:] for n in names if n[:2] in ("B-", "I-")})


def entity_summary(ids: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per type: texts holding one or more of its entities, and its entities per text; the histogram of
    entities per text (COUNT_BINS, the last bin: that many or more)."""
    types = entity_types(names)
    ents = entity_sets(ids, names)
    per_type = np.array([[sum(e[0] == t for e in s) for t in types] for s in ents], dtype=np.int64).reshape(
        len(ents), len(types))
    counts = np.minimum([len(s) for s in ents], COUNT_BINS - 1) if ents else np.zeros(0, dtype=np.int64)
    n = max(len(ents), 1)
    return {"types": types, "texts_with_type": (per_type > 0).sum(0).tolist(),
            "entities_per_text": {t: round(float(c) / n, 6) for t, c in zip(types, per_type.sum(0))},
            "entity_count_hist": np.bincount(counts, minlength=COUNT_BINS).tolist()}


def entity_match_counts(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> np.ndarray:
    """Per text: (entities found exactly: span and type, entities predicted, true entities), for micro-F1."""
    return np.array([(len(t & p), len(p), len(t)) for t, p in zip(entity_sets(y_true, names),
                                                                   entity_sets(y_pred, names))],
                    dtype=np.int64).reshape(len(y_true), 3)
