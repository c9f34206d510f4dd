"""Words <-> sub-tokens for NER. Training: the first sub-token of each word carries the word's tag, the others are
-100 (ignored by the loss), and entities lost to truncation are counted. Prediction: a raw string is cut
into words (runs of letters/digits, single other characters), windows of max_length sub-tokens cover a long text,
and each entity comes back with character offsets into the ORIGINAL string (the words' own offsets in it; the tokenizer only says which sub-token starts a
word), so emoji, accents and repeated spaces never shift a span."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from finetune.tasks.ner_tags import spans

IGNORE = -100
# A word: a run of letters/digits (with combining accents), or one other non-space character (punctuation, an
# emoji), as BERT's pre-tokenizer splits them; so "Paulo!!" gives the entity "Paulo", not "Paulo!!".
_WORD = re.compile(r"(?:\w|[\u0300-\u036f])+|[^\w\s]")


@dataclass
class AlignedSentence:
    ids: list[int]
    labels: list[int]  # per sub-token: the word's tag id on its first sub-token, else -100
    word_ids: list[int]  # per sub-token: the word's index, -1 for special tokens


@dataclass
class TruncationCount:
    sentences_truncated: int = 0  # sentences that lost words to max_length
    entities_cut: int = 0  # entities partly beyond max_length (their tail is not trained on)
    entities_dropped: int = 0  # entities wholly beyond max_length
    words_without_subtokens: int = 0  # words the tokenizer turns into nothing (e.g. a lone zero-width char)


def align(tokens: list[list[str]], tag_ids: list[list[int]], label_names: list[str], tok,
          max_length: int) -> tuple[list[AlignedSentence], TruncationCount]:
    enc = tok(tokens, is_split_into_words=True, truncation=True, max_length=max_length)
    count = TruncationCount()
    out = []
    for i, (words, tags) in enumerate(zip(tokens, tag_ids)):
        word_ids = enc.word_ids(i)
        labels, prev = [], None
        for w in word_ids:
            labels.append(IGNORE if w is None or w == prev else int(tags[w]))
            prev = w
        seen = {w for w in word_ids if w is not None}
        kept = max(seen) + 1 if seen else 0
        count.words_without_subtokens += sum(1 for w in range(kept) if w not in seen)
        if kept < len(words):
            count.sentences_truncated += 1
            for _, start, end in spans([label_names[t] for t in tags]):
                count.entities_cut += int(start < kept < end)
                count.entities_dropped += int(start >= kept)
        out.append(AlignedSentence(list(enc["input_ids"][i]), labels, [-1 if w is None else w for w in word_ids]))
    return out, count


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each word of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def encode_windows(words: list[str], tok, max_length: int, stride: int):
    """The words as one or more windows of at most max_length sub-tokens, overlapping by ``stride`` sub-tokens."""
    return tok([words], is_split_into_words=True, truncation=True, max_length=max_length, stride=stride,
               return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="np")


def word_probabilities(enc, probs: np.ndarray, n_words: int) -> np.ndarray:
    """One probability row per word: read at the word's first sub-token, from the window in which that sub-token
    sits farthest from the window's edges (the most context). Words with no sub-token get an all-zero row."""
    out = np.zeros((n_words, probs.shape[-1]), dtype=np.float64)
    best = np.full(n_words, -1)
    for win in range(probs.shape[0]):
        word_ids = enc.word_ids(win)
        n = sum(1 for w in word_ids if w is not None)
        pos = 0
        for j, w in enumerate(word_ids):
            if w is None:
                continue
            pos += 1
            if enc["offset_mapping"][win][j][0] != 0:  # not the word's first sub-token
                continue
            margin = min(pos, n - pos + 1)
            if margin > best[w]:
                best[w], out[w] = margin, probs[win, j]
    return out


def decode_entities(text: str, tok, logits_fn: Callable[[dict], np.ndarray], label_names: list[str],
                    max_length: int, stride: int = 32) -> dict:
    """Entities of ``text`` as [{text, type, start, end, score}], character offsets into ``text`` itself;
    ``logits_fn(batch)`` maps the windows' input_ids/attention_mask to logits (windows, positions, tags).
    score: the mean, over the entity's words, of the probability of the tag each word got."""
    spans_ = word_spans(text)
    words = [text[s:e] for s, e in spans_]
    if not words:
        return {"entities": [], "windows": 0}
    enc = encode_windows(words, tok, max_length, min(stride, max_length // 2))
    logits = logits_fn({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = word_probabilities(enc, z / z.sum(axis=-1, keepdims=True), len(words))
    picked = probs.argmax(axis=1)
    tags = ["O" if not probs[i].any() else label_names[picked[i]] for i in range(len(words))]
    entities = []
    for typ, first, last in spans(tags):
        start, end = spans_[first][0], spans_[last - 1][1]
        score = float(np.mean([probs[i, picked[i]] for i in range(first, last)]))
        entities.append({"text": text[start:end], "type": typ, "start": start, "end": end, "score": round(score, 6)})
    return {"entities": entities, "windows": int(enc["input_ids"].shape[0])}
