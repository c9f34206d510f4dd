"""The documentation holds together: README.md stays a short front page, every docs/*.md page is reachable
from it, and every relative link or image in README.md and docs/*.md points at a file that exists (and, for a
`#anchor` into a Markdown page, at a heading of that page, slugged the way GitHub does it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def _repo_root() -> Path:
    """The folder holding pyproject.toml, wherever this file sits under tests/."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError("no pyproject.toml above tests/")


REPO = _repo_root()
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title"; text may hold one level of brackets
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str, blank_code_spans: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced and indented code blocks, inline code spans blanked unless told."""
    out, fenced, indented, prev_blank = [], False, False, True
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        blank = not line.strip()
        if not blank and line.startswith(("    ", "\t")) and (prev_blank or indented):
            indented = True  # an indented code block starts after a blank line and runs while indented
        elif not blank:
            indented = False
        prev_blank = blank
        if indented or blank:
            continue
        out.append((number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line) if blank_code_spans else line))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (link targets and formatting dropped), lower case, every
    character but letters, digits, '-', '_' and spaces removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text, not its target
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in _prose_lines(page.read_text(encoding="utf-8"), blank_code_spans=False):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2).strip())
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links_in(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in a text's prose, also one broken over two lines."""
    lines = dict(_prose_lines(text))
    links = []
    for number, line in lines.items():
        joined = line + (" " + lines[number + 1] if number + 1 in lines else "")
        links += [(number, m.group(1)) for m in LINK.finditer(joined) if m.start() < len(line)]
    return links


def relative_links(page: Path) -> list[tuple[int, str]]:
    """Links to files of this repository: not http:, https:, mailto: ..."""
    return [(n, t) for n, t in links_in(page.read_text(encoding="utf-8"))
            if not SCHEME.match(t) and not t.startswith("//")]


def broken_links(page: Path) -> list[str]:
    problems = []
    for number, target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        where = f"{page.relative_to(REPO)}:{number}: {target}"
        dest = page if not path_part else (page.parent / path_part).resolve()
        if path_part and not dest.exists():
            problems.append(f"{where}: no such file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
            continue
        if anchor and dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_and_images_resolve(page):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < 200, f"README.md has {lines} lines; move detail into docs/ (limit: under 200)"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in relative_links(README) if t.partition("#")[0]}
    missing = [str(p.relative_to(REPO)) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_the_checks_see_what_they_should():
    """The helpers themselves: code is skipped, anchors slug like GitHub's."""
    assert github_slug("End to end: `make run` on 2 CPU cores") == "end-to-end-make-run-on-2-cpu-cores"
    assert github_slug("Serving cost: fp32 PyTorch vs ONNX fp32 vs ONNX int8 (CPU)") == (
        "serving-cost-fp32-pytorch-vs-onnx-fp32-vs-onnx-int8-cpu")
    assert github_slug("Hyperparameter search on Katib (optional)") == "hyperparameter-search-on-katib-optional"
    assert len(DOCS) >= 10 and README in PAGES
    sample = ("see [a](x.md) and `[b](y.md)`\n\n    [c](z.md)\n\n```\n[d](w.md)\n```\n![e](img/f.png#g) [h\n"
              "i](#j) [k](https://example.org/l)\n")
    assert links_in(sample) == [(1, "x.md"), (8, "img/f.png#g"), (8, "#j"), (9, "https://example.org/l")]
