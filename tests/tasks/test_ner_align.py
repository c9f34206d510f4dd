"""Word/sub-token alignment for training, and entities decoded with exact character offsets into the original
string (emoji, accents, repeated spaces, a text longer than max_length)."""

import numpy as np
import pytest

from finetune.common.tokens import load_tokenizer
from finetune.tasks.ner_align import IGNORE, align, decode_entities, word_spans

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def tok(base_model_dir):
    return load_tokenizer(base_model_dir)


def test_first_subtoken_carries_the_tag_the_rest_are_ignored(tok):
    words = [["Jonathanovich", "visited", "Paris"]]
    got, count = align(words, [[1, 0, 3]], LABELS, tok, max_length=32)
    s = got[0]
    pieces = tok.convert_ids_to_tokens(s.ids)
    assert pieces[0] == "[CLS]" and s.labels[0] == IGNORE and s.word_ids[0] == -1
    first_of_word0 = s.word_ids.index(0)
    assert s.labels[first_of_word0] == 1
    n_pieces = s.word_ids.count(0)
    assert n_pieces > 1 and s.labels[first_of_word0 + 1:first_of_word0 + n_pieces] == [IGNORE] * (n_pieces - 1)
    assert [lab for lab in s.labels if lab != IGNORE] == [1, 0, 3]
    assert count.sentences_truncated == 0 and count.entities_cut == 0


def test_entities_lost_to_truncation_are_counted(tok):
    words = [["a", "b", "c", "Mary", "Ann", "x", "Rome"]]
    tags = [[0, 0, 0, 1, 2, 0, 3]]
    _, count = align(words, tags, LABELS, tok, max_length=6)  # [CLS] a b c Mary [SEP]: Ann and Rome fall off
    assert (count.sentences_truncated, count.entities_cut, count.entities_dropped) == (1, 1, 1)


def tagging_fn(tok, tag_of_piece: dict[str, int]):
    """Logits that give each sub-token the tag named for it (O otherwise): a model whose answer is known."""
    ids = {tok.convert_tokens_to_ids(p): t for p, t in tag_of_piece.items()}

    def fn(batch):
        out = np.zeros((*batch["input_ids"].shape, len(LABELS)))
        out[..., 0] = 5.0
        for idx, t in np.ndenumerate(batch["input_ids"]):
            if t in ids:
                out[idx][ids[t]] = 10.0
        return out
    return fn


def test_offsets_into_the_original_string_with_emoji_accents_and_repeated_spaces(tok):
    text = "😀  Hi   José  from São   Paulo!! ❤️"
    fn = tagging_fn(tok, {"jose": 1, "sao": 3, "paulo": 4})
    got = decode_entities(text, tok, fn, LABELS, max_length=64)
    ents = [(e["text"], e["type"], e["start"], e["end"]) for e in got["entities"]]
    assert ents == [("José", "PER", text.index("José"), text.index("José") + 4),
                    ("São   Paulo", "LOC", text.index("São"), text.index("Paulo") + 5)]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in got["entities"])
    assert 0.9 < got["entities"][0]["score"] <= 1.0 and got["windows"] == 1


def test_decomposed_accent_stays_inside_the_word():
    text = "Jose\u0301 went"
    assert word_spans(text) == [(0, 5), (6, 10)]


def test_a_text_longer_than_max_length_is_read_in_windows_and_keeps_its_offsets(tok):
    text = " ".join(["filler"] * 120) + "  met   Zoë"
    fn = tagging_fn(tok, {"zoe": 1})
    got = decode_entities(text, tok, fn, LABELS, max_length=32, stride=8)
    assert got["windows"] > 4
    assert got["entities"] == [{"text": "Zoë", "type": "PER", "start": len(text) - 3, "end": len(text),
                                "score": pytest.approx(got["entities"][0]["score"])}]
