"""NER data through the tag rules (file, line, rule in every refusal) and the entity-type strata of the split."""

from finetune.common.token_files import parse_conll
from finetune.tasks.ner_data import NO_ENTITY, check_tagged, strata


def test_iobes_file_is_accepted_converted_to_iob2_and_its_scheme_recorded():
    got = check_tagged(parse_conll("New S-LOC\nYork O\n\nAnn B-PER\nLee E-PER\n"), "d.conll")
    assert got.failures == [] and got.scheme == "iobes" and got.types == ["LOC", "PER"]
    assert list(got.frame["tags"]) == [["B-LOC", "O"], ["B-PER", "I-PER"]]


def test_each_broken_rule_names_file_line_and_rule():
    text = "EU B-ORG\nrejects I-MISC\n\nNew York\tB-LOC\n\nAnn B-FOOD\n"
    got = check_tagged(parse_conll(text), "bad.conll", types=["ORG", "MISC", "LOC", "PER"])
    by_rule = {f["rule"]: f for f in got.failures}
    assert set(by_rule) == {"entity_start", "token_whitespace", "type_in_set"}
    assert by_rule["entity_start"]["lines"] == [2]
    assert by_rule["entity_start"]["message"].startswith("bad.conll: line 2: rule 'entity_start': tag 'I-MISC'")
    assert by_rule["token_whitespace"]["lines"] == [4] and by_rule["type_in_set"]["lines"] == [6]


def test_strata_put_each_sentence_under_its_rarest_type():
    tags = [["B-PER", "B-LOC"], ["B-PER"], ["B-PER"], ["O"], ["B-LOC"]]
    assert strata(tags) == ["LOC", "PER", "PER", NO_ENTITY, "LOC"]
