"""The docs hold together: no dead relative link or missing anchor across ``README.md`` and
``docs/*.md``, every ``bench/results/`` path they name exists, and every figure quoted in
``docs/results.md`` (and in the README's results section) stands in the committed file its section
names.

The figures rule, which the checker enforces and ``docs/results.md`` is written to:

* a *section* runs from one heading to the next; the files it names are the ``bench/results/...``
  paths in its text (a folder stands for the files in it);
* every **table row** (the header excepted) quotes figures from one line of one of those files:
  each number in its cells after the first (the first cell is the row's label) must occur in that
  one line, so a number taken from the wrong row or mistyped fails;
* every **prose decimal** (a number with a decimal point or an exponent, outside code spans) must
  occur in one of the section's files; numbers right after ``=``, ``≤``, ``≥``, ``<`` or ``>`` are
  settings or targets, not measurements, and are exempt; versions (``3.11.7``) are not numbers;
* every quoted ``RESULT k=v ...`` code span must match one ``RESULT`` line of those files, pair by
  pair;
* a section that quotes any such figure and names no existing file fails.

Numbers compare as written, after mapping ``−`` to ``-``, dropping a leading ``+`` and thousands
commas (``1,402`` is ``1402``); ``0.95`` does not match ``0.953``: quote the file's digits.
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.paths import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
RESULTS_PAGE = ROOT / "docs" / "results.md"

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
RESULTS_PATH = re.compile(r"bench/results/[\w.\-/]*[\w/]")
NUMBER = re.compile(r"(?<![\w.@])[-+−]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)*)(?:e[-+]?\d+)?(?!\d)")
EXEMPT_BEFORE = re.compile(r"[=≤≥<>]\s*$")


# --- markdown structure -------------------------------------------------------------------------


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line index, line) for every line outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.split("\n")):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def github_slug(title: str) -> str:
    """GitHub's heading anchor: markup dropped, lower case, punctuation but ``-`` and ``_`` removed,
    spaces to ``-`` (letters and digits of any script kept)."""
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # links and images: their text
    title = re.sub(r"<[^>]+>", "", title)  # inline HTML
    title = title.replace("`", "")
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return slug.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a page defines: its headings' slugs (``-1``, ``-2`` for repeats) and explicit
    ``<a id=...>`` / ``<a name=...>``."""
    seen: dict[str, int] = {}
    out = set(EXPLICIT_ANCHOR.findall(text))
    for _, line in _outside_fences(text):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(text: str) -> list[str]:
    """Link and image targets outside code blocks, code spans and HTML comments."""
    body = "\n".join(line for _, line in _outside_fences(HTML_COMMENT.sub("", text)))
    body = CODE_SPAN.sub("", body)
    return LINK.findall(body) + IMAGE.findall(body)


def link_problems(page: Path, text: str) -> list[str]:
    """Dead relative links and missing anchors of one page (external links are not fetched)."""
    problems = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{page.name}: dead link {target!r} ({dest} does not exist)")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{page.name}: anchor on a non-markdown target {target!r}")
            elif anchor not in anchors(dest.read_text()):
                problems.append(f"{page.name}: no anchor #{anchor} in {dest.name} ({target!r})")
    return problems


# --- figures ------------------------------------------------------------------------------------


def normalize(token: str) -> str:
    token = token.replace("−", "-").lstrip("+")
    return token.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?(e[-+]?\d+)?", token) else token


def numbers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, normalized) of each number in ``text``; versions (two or more dots) left out."""
    out = []
    for m in NUMBER.finditer(text):
        if m.group().count(".") > 1:
            continue  # a version
        if m.group()[0] not in "-+−" and re.search(r"[A-Za-z]-$", text[: m.start()]):
            continue  # part of a name: Llama-3.1, top-8
        out.append((m.start(), m.end(), normalize(m.group())))
    return out


def is_decimal(token: str) -> bool:
    return "." in token or "e" in token


@functools.cache
def _file_lines(path: Path) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(n for _, _, n in numbers(line)) for line in path.read_text().splitlines())


@functools.cache
def _result_lines(path: Path) -> tuple[dict[str, str], ...]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("RESULT "):
            out.append(dict(pair.split("=", 1) for pair in line.split()[1:] if "=" in pair))
    return tuple(out)


def _named_files(section: str) -> list[Path]:
    files: list[Path] = []
    for rel in dict.fromkeys(RESULTS_PATH.findall(section)):
        path = ROOT / rel
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".txt", ".md", ".json"))
        elif path.is_file():
            files.append(path)
    return list(dict.fromkeys(files))


@dataclass(frozen=True)
class Figure:
    """One quoted figure: where it stands in the page and what must hold for it."""

    start: int
    end: int
    token: str
    kind: str  # "row" (with the row's other figures), "prose", "result"
    row: tuple[str, ...] = ()


def _sections(text: str) -> list[tuple[int, str]]:
    """(offset, text) of each heading-to-heading section (fenced code does not split)."""
    starts, offset, fenced = [0], 0, False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and HEADING.match(line) and offset:
            starts.append(offset)
        offset += len(line) + 1
    starts.append(len(text))
    return [(a, text[a:b]) for a, b in itertools.pairwise(starts)]


def _blank(text: str, pattern: re.Pattern[str]) -> str:
    """``text`` with every match of ``pattern`` overwritten by spaces (offsets kept)."""
    return pattern.sub(lambda m: " " * len(m.group()), text)


def section_figures(section: str) -> list[Figure]:
    """The figures a section quotes, with offsets into ``section``."""
    figures: list[Figure] = []
    for m in CODE_SPAN.finditer(section):
        if m.group(2).startswith("RESULT "):
            figures.append(Figure(m.start(2), m.end(2), m.group(2), "result"))
    plain = _blank(_blank(_blank(section, HTML_COMMENT), CODE_SPAN), re.compile(r"\]\([^)]*\)"))
    offset, fenced, header_next = 0, False, True
    for line in plain.split("\n"):
        stripped = line.strip()
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            pass
        elif stripped.startswith("|"):
            if re.fullmatch(r"\|?[\s:|-]+\|?", stripped):
                header_next = False
            elif not header_next:
                first_bar = line.index("|")
                second_bar = line.index("|", first_bar + 1)
                cells = [(offset + second_bar + a, n) for a, _, n in numbers(line[second_bar:])]
                row = tuple(n for _, n in cells)
                figures += [Figure(s, s + len(_raw(section, s)), n, "row", row) for s, n in cells]
        else:
            header_next = True
            for a, b, n in numbers(line):
                if is_decimal(n) and not EXEMPT_BEFORE.search(line[:a]):
                    figures.append(Figure(offset + a, offset + b, n, "prose"))
        offset += len(line) + 1
    return figures


def _raw(text: str, start: int) -> str:
    m = NUMBER.match(text, start)
    assert m is not None
    return m.group()


def figure_problems(text: str, where: str) -> list[str]:
    """Every quoted figure of ``text`` that its section's files do not hold, and every section that
    quotes figures without naming an existing file under bench/results/."""
    problems = []
    for _, section in _sections(text):
        figures = section_figures(section)
        if not figures:
            continue
        title = section.split("\n", 1)[0][:60]
        files = _named_files(section)
        if not files:
            problems.append(f"{where} [{title}]: quotes figures but names no file under bench/results/")
            continue
        lines = [line for f in files for line in _file_lines(f)]
        every = frozenset().union(*lines)
        checked_rows: set[tuple[int, tuple[str, ...]]] = set()
        for fig in figures:
            if fig.kind == "result":
                pairs = dict(p.split("=", 1) for p in fig.token.split()[1:])
                results = [r for f in files for r in _result_lines(f)]
                if not any(all(r.get(k) == v for k, v in pairs.items()) for r in results):
                    problems.append(f"{where} [{title}]: `{fig.token}` is no RESULT line of {files}")
            elif fig.kind == "prose":
                if fig.token not in every:
                    problems.append(f"{where} [{title}]: {fig.token} is in none of {[f.name for f in files]}")
            else:
                key = (section.rfind("\n", 0, fig.start), fig.row)
                if key in checked_rows:
                    continue
                checked_rows.add(key)
                if not any(set(fig.row) <= line for line in lines):
                    names = [f.name for f in files]
                    problems.append(
                        f"{where} [{title}]: no line of {names} holds the row's figures {list(fig.row)}"
                    )
    return problems


def all_figures(text: str) -> list[tuple[Figure, int, list[Path]]]:
    """Each figure of ``text`` with its section's offset and files (for the mutation test)."""
    return [(fig, off, _named_files(sec)) for off, sec in _sections(text) for fig in section_figures(sec)]


def readme_results(text: str) -> str:
    """The README's results section (from its "Results" heading to the next heading of its level)."""
    match = re.search(r"^(#{1,6}) .*Results.*$", text, re.M)
    assert match, "README.md has no Results heading"
    level = len(match.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[match.end() :], re.M)
    return text[match.start() : match.end() + end.start() if end else len(text)]


# --- the tests ----------------------------------------------------------------------------------


def test_pages_exist() -> None:
    names = {p.name for p in DOCS}
    expected = {
        "generate.md", "prepare.md", "score.md", "train.md", "convert.md", "eval.md", "study.md",
        "slurm.md", "gpu_check.md", "method.md", "results.md", "development.md",
    }  # fmt: skip
    assert expected <= names, f"missing docs pages: {sorted(expected - names)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors(page: Path) -> None:
    assert link_problems(page, page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_results_files_exist(page: Path) -> None:
    text = page.read_text()
    missing = [
        m.group()
        for m in RESULTS_PATH.finditer(text)
        if text[m.end() : m.end() + 1] not in ("*", "<") and not (ROOT / m.group()).exists()
    ]
    assert missing == [], f"{page.name} names bench/results paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_opens_with_its_command(page: Path) -> None:
    """Each docs page's first block after its title is the command that runs what it describes."""
    if page.name == "README.md":
        return
    lines = [line for line in page.read_text().split("\n")[1:] if line.strip()]
    assert lines and FENCE.match(lines[0]), f"{page.name}: the first thing after the title is no code block"


def test_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 210, "README.md is meant to stay at about 200 lines"
    for command in ("bash scripts/setup.sh && .venv/bin/nemo-dcod demo", "bash scripts/test.sh"):
        assert command in text
    for page in DOCS:
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def test_results_figures_are_in_their_files() -> None:
    assert figure_problems(RESULTS_PAGE.read_text(), "docs/results.md") == []
    assert len(all_figures(RESULTS_PAGE.read_text())) > 100  # the page really quotes figures


def test_readme_results_figures_are_in_their_files() -> None:
    section = readme_results((ROOT / "README.md").read_text())
    assert all_figures(section), "the README's results section quotes no figure"
    assert figure_problems(section, "README.md") == []


def test_a_wrong_figure_fails() -> None:
    """Each quoted figure of docs/results.md, changed in its last digit to a value its section's
    files do not hold, makes the check fail: the check reads every figure, not a sample."""
    text = RESULTS_PAGE.read_text()
    unchanged = []
    for fig, offset, files in all_figures(text):
        if fig.kind == "result":
            value = fig.token.split()[-1].split("=")[1]
            start = offset + fig.end - len(value)
            token, end = value, offset + fig.end
        else:
            start, end, token = (
                offset + fig.start,
                offset + fig.end,
                text[offset + fig.start : offset + fig.end],
            )
        held = frozenset().union(*(line for f in files for line in _file_lines(f)))
        digit_at = max(i for i, c in enumerate(token) if c.isdigit())
        for step in range(1, 10):
            wrong = token[:digit_at] + str((int(token[digit_at]) + step) % 10) + token[digit_at + 1 :]
            if normalize(wrong) not in held:
                break
        else:
            unchanged.append(token)
            continue
        mutated = text[:start] + wrong + text[end:]
        assert figure_problems(mutated, "results.md"), f"{token} -> {wrong} at {start} was not caught"
    assert unchanged == []


def test_checker_on_a_made_up_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules one by one on a page and a results file made here."""
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "x.txt").write_text(
        "a: 1.5 ms vs 3.25 ms: 0.462x\nb: 2.5 ms vs 4.75 ms: 0.526x\nRESULT r=0.462 s=7\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    _file_lines.cache_clear()
    _result_lines.cache_clear()
    head = "## X\n\nFile: `bench/results/x.txt`.\n\n| what | ours | base | ratio |\n|---|---|---|---|\n"
    good = head + "| a | 1.5 | 3.25 | 0.462 |\n\nProse 0.526 and `RESULT r=0.462`; target ≥ 0.9.\n"
    assert figure_problems(good, "t") == []
    assert figure_problems(good.replace("| 0.462 |", "| 0.46 |"), "t")  # rounded is wrong
    assert figure_problems(good.replace("| 0.462 |", "| 0.526 |"), "t")  # another line's figure
    assert figure_problems(good.replace("Prose 0.526", "Prose 0.527"), "t")
    assert figure_problems(good.replace("`RESULT r=0.462`", "`RESULT r=0.463`"), "t")
    assert figure_problems(good.replace("`bench/results/x.txt`", "nothing"), "t")  # no file named
    assert figure_problems(good.replace("bench/results/x.txt", "bench/results/y.txt"), "t")
    _file_lines.cache_clear()
    _result_lines.cache_clear()


def test_link_checker_on_made_up_pages(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(
        "# Page A\n\n## The `score` stage: what, how?\n\n```\n# not a heading\n```\n"
    )
    assert anchors((tmp_path / "a.md").read_text()) == {"page-a", "the-score-stage-what-how"}
    page = tmp_path / "b.md"
    assert link_problems(page, "[ok](a.md#the-score-stage-what-how) [web](https://x.org/#y)") == []
    assert link_problems(page, "[dead](c.md)")
    assert link_problems(page, "[anchor](a.md#not-a-heading)")
    assert link_problems(page, "[no code](`a.md`)") == []  # inside a code span: not a link
    assert github_slug("DisCorD's statistics: b and ḡ") == "discords-statistics-b-and-ḡ"
    assert github_slug("70B -> 8B on a Slurm cluster") == "70b---8b-on-a-slurm-cluster"
