"""Tag schemes: BIO/IOB2, IOB1 and IOBES accepted and converted to IOB2; each broken rule names its token."""

import pytest

from finetune.tasks.ner_tags import check_sentence, detect_scheme, spans, to_iob2


def rules(tags, tokens=None, scheme="bio", types=None):
    tokens = tokens or [f"w{i}" for i in range(len(tags))]
    return [(v.rule, v.token) for v in check_sentence(tags, tokens, scheme, types, 0)]


def test_the_same_entities_in_three_schemes_convert_to_one_iob2():
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O", "B-ORG"]
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "O", "I-ORG"]
    iobes = ["B-PER", "E-PER", "O", "S-LOC", "S-LOC", "O", "S-ORG"]
    for tags, scheme in ((iob2, "bio"), (iob1, "iob1"), (iobes, "iobes")):
        assert rules(tags, scheme=scheme) == []
        assert to_iob2(tags, scheme) == iob2
    assert spans(iob2) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 6, 7)]


def test_auto_picks_iobes_when_s_or_e_occur_and_never_guesses_iob1():
    assert detect_scheme([["O", "S-LOC"]]) == "iobes"
    assert detect_scheme([["I-LOC", "O"]]) == "bio"  # a BIO file with a stray I- is refused, not read as IOB1
    assert detect_scheme([["I-LOC"]], "iob1") == "iob1"
    with pytest.raises(ValueError, match="unknown tag scheme"):
        detect_scheme([], "bilou2")


def test_an_i_that_starts_an_entity_is_refused_in_bio_and_iobes_with_its_token():
    assert rules(["O", "I-PER"]) == [("entity_start", 1)]
    assert rules(["B-LOC", "I-PER"]) == [("entity_start", 1)]
    assert rules(["I-PER"], scheme="iob1") == []
    assert ("entity_start", 1) in rules(["O", "E-PER"], scheme="iobes")
    assert rules(["B-PER", "O"], scheme="iobes") == [("entity_end", 0)]


def test_length_empty_whitespace_format_and_unknown_type():
    assert rules(["O"], tokens=["a", "b"]) == [("tags_match_tokens", -1)]
    assert [v.rule for v in check_sentence([], [], "bio", None, 3)] == ["sentence_not_empty"]
    assert rules(["O", "B-X"], tokens=["a", "New York"]) == [("token_whitespace", 1)]
    assert rules(["O", "PER"]) == [("tag_format", 1)]
    assert rules(["S-PER"], scheme="bio") == [("tag_format", 0)]
    assert rules(["B-PER", "B-FOOD"], types=["PER", "LOC"]) == [("type_in_set", 1)]
