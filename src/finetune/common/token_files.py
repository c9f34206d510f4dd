"""Reading token-tagged data (NER): CoNLL-style text, or JSONL/Parquet rows holding a list of tokens and a list of
tags. Every sentence keeps the file line (text) or row (JSONL/Parquet) of each of its tokens, so that a rule broken
later can name exactly where."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.common.files import _OPENERS, DataError, _decode, read_table, split_lines

CONLL_FORMATS = (".conll", ".conllu", ".txt", ".iob", ".bio", ".bioes")
TOKEN_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("tags", "ner_tags", "labels")


@dataclass
class TaggedSentence:
    tokens: list[str]
    tags: list[str]
    lines: list[int]  # per token: the 1-based line in a text file, or the row of a JSONL/Parquet file
    split: str | None = None  # a JSONL/Parquet row's user-given split (data.split_column), when the file has one

    @property
    def line(self) -> int:
        return self.lines[0] if self.lines else 0


def is_conll(path: str | Path) -> bool:
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in CONLL_FORMATS


def _columns(line: str) -> list[str]:
    # A tab-separated file may hold spaces inside a column; otherwise any run of spaces separates columns.
    return [c.strip() for c in line.split("\t")] if "\t" in line else line.split()


def parse_conll(text: str, path: str | Path = "<text>") -> list[TaggedSentence]:
    """Sentences of a CoNLL-style text: one token per line, the token first and its tag in the LAST column (so
    CoNLL-2003's `token POS chunk tag` works), a blank or whitespace-only line between sentences, -DOCSTART- lines
    ignored. A token line without a tag column is refused with its line number."""
    sentences: list[TaggedSentence] = []
    cur = TaggedSentence([], [], [])
    for n, line in enumerate(split_lines(text), start=1):
        cols = _columns(line)
        if not any(cols):
            if cur.tokens:
                sentences.append(cur)
            cur = TaggedSentence([], [], [])
            continue
        if cols[0] == "-DOCSTART-":
            continue
        if not cols[0]:
            raise DataError("token_not_empty", f"line {n} has an empty token before its tag: {line[:80]!r}", path, [n])
        if len(cols) < 2 or not cols[-1]:
            raise DataError("token_tag_columns", f"line {n} has no tag column (expected `token<TAB or SPACE>tag`, "
                            f"tag last): {line[:80]!r}", path, [n])
        cur.tokens.append(cols[0])
        cur.tags.append(cols[-1])
        cur.lines.append(n)
    if cur.tokens:
        sentences.append(cur)
    if not sentences:
        raise DataError("not_empty", "holds no tagged token lines", path)
    return sentences


def _as_list(value, row: int, column: str, path: str | Path) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DataError("token_list", f"row {row}: column '{column}' holds a {type(value).__name__}, expected a "
                        f"list (one entry per token)", path, [row])
    return list(value)


def _pick(frame: pd.DataFrame, wanted: str | None, defaults: tuple[str, ...], what: str, path) -> str:
    names = (wanted,) if wanted else defaults
    for name in names:
        if name in frame.columns:
            return name
    raise DataError("required_columns", f"no {what} column: expected one of {list(names)}, found "
                    f"{list(frame.columns)}", path)


def rows_to_sentences(frame: pd.DataFrame, path: str | Path, tokens_column: str | None = None,
                      tags_column: str | None = None, split_column: str | None = None) -> list[TaggedSentence]:
    """Sentences of a table whose rows hold a list of tokens and a list of tags (the Hugging Face layout). Tags
    must be strings: integer ids (a datasets ClassLabel) carry no type names, so they are refused. A
    ``split_column`` present in the table gives each sentence its split (checked by validate)."""
    tok_col = _pick(frame, tokens_column, TOKEN_COLUMNS, "tokens", path)
    tag_col = _pick(frame, tags_column, TAG_COLUMNS, "tags", path)
    splits = frame[split_column].astype(str) if split_column and split_column in frame.columns else None
    out = []
    for row, tokens, tags in zip(frame.index, frame[tok_col], frame[tag_col]):
        tokens, tags = _as_list(tokens, row, tok_col, path), _as_list(tags, row, tag_col, path)
        bad = next((t for t in [*tokens, *tags] if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError("token_strings", f"row {row}: tokens and tags must be strings, found {bad!r} "
                            f"(map integer tag ids to their names first)", path, [row])
        out.append(TaggedSentence([str(t) for t in tokens], [str(t) for t in tags], [int(row)] * len(tokens),
                                  None if splits is None else splits[row]))
        if not tokens:
            out[-1].lines = [int(row)]  # an empty sentence still names its row (refused by the tag rules)
    return out


def read_tagged(path: str | Path, tokens_column: str | None = None, tags_column: str | None = None,
                split_column: str | None = None) -> list[TaggedSentence]:
    """Token-tagged sentences from a CoNLL-style text file or a JSONL/Parquet table (optionally compressed).
    ``split_column``: read from tables only (a CoNLL file has no per-sentence column)."""
    p = Path(path)
    if not is_conll(p):
        return rows_to_sentences(read_table(p), p, tokens_column, tags_column, split_column)
    if not p.is_file():
        raise DataError("file_exists", "file not found (or not a regular file)", p)
    raw = p.read_bytes()
    suffix = p.suffix.lower()
    if suffix in _OPENERS:
        raw = _OPENERS[suffix](raw)
    text = _decode(raw, p)
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError("no_nul_bytes", f"NUL byte at line {line}: binary or corrupt file", p, [line])
    return parse_conll(text, p)


def sentences_frame(sentences: list[TaggedSentence]) -> pd.DataFrame:
    """One row per sentence: tokens, tags, the line it starts at, and text (tokens joined by one space)."""
    return pd.DataFrame({"tokens": [s.tokens for s in sentences], "tags": [s.tags for s in sentences],
                         "line": [s.line for s in sentences], "text": [" ".join(s.tokens) for s in sentences]})
