"""Entities of a raw string from a token-classification model, with character offsets into that ORIGINAL string.

SELF-CONTAINED (numpy and a ``tokenizers.Tokenizer`` only, no finetune import): the registry logs this file
beside the pyfunc models (``code_paths``; tasks/token.py PYFUNC_CODE), which import it as ``ner_decode`` where
the finetune package is not installed (``mlflow models serve``, the int8 image).

A text is cut into words (runs of letters/digits with their combining accents, or one other non-space
character: punctuation, an emoji), as BERT's pre-tokenizer cuts them; the words go through the tokenizer
pre-split, in windows of at most max_length sub-tokens overlapping by ``stride`` sub-tokens; each word's tag is
read at its first sub-token, in the window where that sub-token has the most context. An entity's offsets are its
first and last words' own offsets in the text, so emoji, accents (composed or decomposed), repeated spaces, tabs
and newlines never shift a span: ``text[start:end] == entity["text"]`` always.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

STRIDE = 32  # sub-tokens shared by consecutive windows of a long text (at most half of max_length)
_WORD = re.compile(r"(?:\w|[\u0300-\u036f])+|[^\w\s]")


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each word of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def window_tokenizer(tokenizer, max_length: int, stride: int = STRIDE):
    """A copy of ``tokenizer`` (a ``tokenizers.Tokenizer``) that cuts pre-split words into windows of
    ``max_length`` sub-tokens overlapping by ``stride`` (at most half of max_length), unpadded."""
    tok = tokenizer.__class__.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length, stride=min(stride, max_length // 2))
    tok.no_padding()
    return tok


def text_windows(words: list[str], tok) -> list:
    """The windows (``tokenizers.Encoding``) of ``words``, ``tok`` from window_tokenizer."""
    first = tok.encode(words, is_pretokenized=True)
    return [first, *first.overflowing]


def padded(wins: list, pad_id: int) -> dict[str, np.ndarray]:
    """int64 input_ids/attention_mask of windows, padded to the longest."""
    width = max(len(w.ids) for w in wins)
    ids = np.full((len(wins), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(wins), width), dtype=np.int64)
    for i, w in enumerate(wins):
        ids[i, :len(w.ids)] = w.ids
        mask[i, :len(w.ids)] = w.attention_mask
    return {"input_ids": ids, "attention_mask": mask}


def window_probabilities(wins: list, logits_fn: Callable[[dict], np.ndarray], pad_id: int,
                         chunk: int) -> list[np.ndarray]:
    """Tag probabilities (positions, tags) of each window: the windows of all texts run together, sorted by length
    and ``chunk`` at a time, so each model call pads to its own longest window."""
    out: list[np.ndarray] = [np.empty(0)] * len(wins)
    order = sorted(range(len(wins)), key=lambda i: len(wins[i].ids))
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        probs = softmax(np.asarray(logits_fn(padded([wins[i] for i in part], pad_id)), dtype=np.float64))
        for row, i in enumerate(part):
            out[i] = probs[row, :len(wins[i].ids)]
    return out


def word_probabilities(wins: list, probs: list[np.ndarray], n_words: int) -> np.ndarray:
    """One probability row per word: read at the word's first sub-token, from the window in which that sub-token
    sits farthest from the window's edges (the most context). Words with no sub-token get an all-zero row."""
    out = np.zeros((n_words, probs[0].shape[-1]), dtype=np.float64)
    best = np.full(n_words, -1)
    for win, enc in enumerate(wins):
        word_ids = enc.word_ids
        n = sum(1 for w in word_ids if w is not None)
        pos = 0
        for j, w in enumerate(word_ids):
            if w is None:
                continue
            pos += 1
            if enc.offsets[j][0] != 0:  # not the word's first sub-token (offsets are within the word)
                continue
            margin = min(pos, n - pos + 1)
            if margin > best[w]:
                best[w], out[w] = margin, probs[win][j]
    return out


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities of IOB2 tags as (type, first token, last token + 1). A stray I- starts its own entity, as seqeval's
    default mode reads it."""
    out: list[tuple[str, int, int]] = []
    start, cur = -1, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, typ = (tag[0], tag[2:]) if len(tag) > 2 and tag[1] in "-_" else ("O", "")
        if cur and (prefix != "I" or typ != cur):
            out.append((cur, start, i))
            cur = ""
        if prefix in ("B", "I") and not cur:
            start, cur = i, typ
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def decode(text: str, tok, logits_fn: Callable[[dict], np.ndarray], labels: list[str], pad_id: int = 0) -> dict:
    """decode_many of one text."""
    return decode_many([text], tok, logits_fn, labels, pad_id)[0]


def decode_many(texts: list[str], tok, logits_fn: Callable[[dict], np.ndarray], labels: list[str], pad_id: int = 0,
                chunk: int = 32) -> list[dict]:
    """``{"entities": [{text, type, start, end, score}], "windows": n}`` per text; ``logits_fn(batch)`` maps
    windows' input_ids/attention_mask to logits (windows, positions, tags); ``tok`` from window_tokenizer.
    score: the mean, over the entity's words, of the probability of the tag each word got. A text without words:
    no window, no entity."""
    offsets = [word_spans(t) for t in texts]
    wins = [text_windows([t[s:e] for s, e in o], tok) if o else [] for t, o in zip(texts, offsets)]
    flat = [w for ws in wins for w in ws]
    probs = window_probabilities(flat, logits_fn, pad_id, chunk) if flat else []
    out, first = [], 0
    for text, spans_, ws in zip(texts, offsets, wins):
        words = word_probabilities(ws, probs[first:first + len(ws)], len(spans_)) if ws else None
        first += len(ws)
        out.append({"entities": _entities(text, spans_, words, labels) if ws else [], "windows": len(ws)})
    return out


def _entities(text: str, offsets: list[tuple[int, int]], probs: np.ndarray, labels: list[str]) -> list[dict]:
    """Each word's argmax tag (O for a word with no sub-token), its IOB2 spans as entities of ``text``."""
    picked = probs.argmax(axis=1)
    tags = [labels[picked[i]] if probs[i].any() else "O" for i in range(len(offsets))]
    entities = []
    for typ, first, last in spans(tags):
        start, end = offsets[first][0], offsets[last - 1][1]
        score = float(np.mean([probs[i, picked[i]] for i in range(first, last)]))
        entities.append({"text": text[start:end], "type": typ, "start": start, "end": end, "score": round(score, 6)})
    return entities
