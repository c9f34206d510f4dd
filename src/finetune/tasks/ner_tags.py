"""Tag schemes of token-tagged data. Accepted: BIO (= IOB2, the default), IOB1 and IOBES (= BIOES, BILOU with
L/U read as E/S). Everything is converted to IOB2 inside the pipeline and the input's scheme is recorded.

IOB1 (an entity may start with I-) cannot be told apart from a broken BIO file, so it is never guessed: `auto`
picks IOBES when S-/E- tags occur and BIO otherwise; IOB1 must be named.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.tasks.ner_decode import spans  # noqa: F401 (IOB2 entities: shared with the pyfunc models)

SCHEMES = ("auto", "bio", "iob1", "iobes")
_PREFIXES = {"bio": "BI", "iob1": "BI", "iobes": "BIES"}
_ALIASES = {"L": "E", "U": "S"}  # BILOU


@dataclass(frozen=True)
class TagViolation:
    rule: str
    sentence: int  # index of the sentence
    token: int  # index of the token inside it (-1: the sentence as a whole)
    message: str


def split_tag(tag: str) -> tuple[str, str]:
    """('B', 'person') for 'B-person', ('O', '') for 'O'. Both '-' and '_' separate prefix and type."""
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[1] in "-_":
        return _ALIASES.get(tag[0], tag[0]), tag[2:]
    return "?", tag


def detect_scheme(tag_lists: list[list[str]], scheme: str = "auto") -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme != "auto":
        return scheme
    has_es = any(split_tag(t)[0] in ("E", "S") for tags in tag_lists for t in tags)
    return "iobes" if has_es else "bio"


def _token_violation(prefix: str, typ: str, prev: tuple[str, str], scheme: str) -> str | None:
    """Why this tag cannot follow the previous one under the scheme (None when it can)."""
    if prefix != "O" and prefix not in _PREFIXES[scheme]:
        return "tag_format"
    continues = prev[1] == typ and prev[0] in ("B", "I")
    if prefix in ("I", "E") and scheme in ("bio", "iobes") and not continues:
        return "entity_start"
    return None


def check_sentence(tags: list[str], tokens: list[str], scheme: str, types: list[str] | None,
                   index: int) -> list[TagViolation]:
    """Every rule one sentence breaks: length, empty, whitespace inside a token, tag format, an I-/E- that starts
    an entity where the scheme forbids it, an unclosed IOBES entity, a type outside ``types`` (when given)."""
    if not tokens:
        return [TagViolation("sentence_not_empty", index, -1, "empty sentence (no tokens)")]
    if len(tags) != len(tokens):
        return [TagViolation("tags_match_tokens", index, -1, f"{len(tags)} tags for {len(tokens)} tokens")]
    out = [TagViolation("token_whitespace", index, i, f"token {tok!r} holds whitespace")
           for i, tok in enumerate(tokens) if not tok or any(c.isspace() for c in tok)]
    prev = ("O", "")
    for i, tag in enumerate(tags):
        prefix, typ = split_tag(tag)
        rule = _token_violation(prefix, typ, prev, scheme)
        if rule == "tag_format":
            out.append(TagViolation(rule, index, i, f"tag {tag!r} is not O or {'/'.join(_PREFIXES[scheme])}-TYPE"))
        elif rule == "entity_start":
            out.append(TagViolation(rule, index, i, f"tag {tag!r} starts an entity after {_show(prev)}, which "
                                    f"{scheme.upper()} forbids (B-{typ} starts one; set the tag scheme to iob1 if "
                                    f"the file is IOB1)"))
        elif types is not None and typ and typ not in types:
            out.append(TagViolation("type_in_set", index, i, f"entity type {typ!r} is not in validate.labels"))
        if scheme == "iobes" and prev[0] in ("B", "I") and prev[1] and not (prefix in ("I", "E") and typ == prev[1]):
            out.append(TagViolation("entity_end", index, i - 1, f"IOBES entity {prev[1]!r} is not closed by E-/S-"))
        prev = (prefix, typ) if rule is None else ("O", "")
    if scheme == "iobes" and prev[0] in ("B", "I") and prev[1]:
        out.append(TagViolation("entity_end", index, len(tags) - 1, f"IOBES entity {prev[1]!r} is not closed"))
    return out


def _show(prev: tuple[str, str]) -> str:
    return "the sentence start" if prev == ("O", "") else f"'{prev[0]}-{prev[1]}'"


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """The same entities in IOB2: every entity starts with B-, continues with I-. Call on checked tags only."""
    out, prev = [], ("O", "")
    for tag in tags:
        prefix, typ = split_tag(tag)
        if prefix == "O":
            out.append("O")
        elif prefix in ("B", "S"):
            out.append(f"B-{typ}")
        elif scheme == "iob1" and not (prev[1] == typ and prev[0] != "O"):
            out.append(f"B-{typ}")  # IOB1: an I- after O or another type starts the entity
        else:
            out.append(f"I-{typ}")
        prev = (prefix, typ)
    return out


def entity_types(tag_lists: list[list[str]]) -> list[str]:
    return sorted({split_tag(t)[1] for tags in tag_lists for t in tags if t != "O"})
