"""Words <-> sub-tokens for NER. Training: the first sub-token of each word carries the word's tag, the others are
-100 (ignored by the loss), and entities lost to truncation are counted. Prediction: a raw string is cut
into words (runs of letters/digits, single other characters), windows of max_length sub-tokens cover a long text,
and each entity comes back with character offsets into the ORIGINAL string (tasks/ner_decode.py), so emoji,
accents and repeated spaces never shift a span."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from finetune.tasks.ner_decode import STRIDE, decode, window_tokenizer, word_spans  # noqa: F401 (re-exported)
from finetune.tasks.ner_tags import spans

IGNORE = -100


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


def decode_entities(text: str, tok, logits_fn: Callable[[dict], np.ndarray], label_names: list[str],
                    max_length: int, stride: int = STRIDE) -> dict:
    """Entities of ``text`` as [{text, type, start, end, score}] with character offsets into ``text`` itself, read
    with a transformers fast tokenizer ``tok`` (ner_decode.decode, the code the pyfunc models run)."""
    windowed = window_tokenizer(tok.backend_tokenizer, max_length, stride)
    return decode(text, windowed, logits_fn, label_names, int(tok.pad_token_id or 0))
