"""The paper's bibliography: one source of truth, ``references.bib`` in the prose folder
(``report/prose/references.bib``, BibTeX), cited from the written sections as ``[@key]`` or
``[@key1; @key2]`` and numbered in order of first citation (``[1]``, ``[2, 5]``) by
:func:`resolve_citations`, which also prints the References section (:func:`bibliography_lines`).

Held to two rules (:func:`check_citations`, a one-line :class:`InputError` naming the file at fault):
every citation resolves to an entry, and every entry is cited. A published figure the prose states
(e.g. a benchmark's accuracy) is recorded in its entry's ``published`` field, so that the number
traces to the entry the sentence cites (:func:`unsourced_numbers`), as the results' numbers trace
to ``results/`` (:mod:`helpers.reporting.check`).

Only the BibTeX subset written here is read: ``@type{key,`` then ``field = {value}`` (braces may
nest), ``field = "value"`` or ``field = 1979``, one entry after another; lines starting with ``%``
are comments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from helpers.core.errors import InputError

BIB = "references.bib"  # in the prose folder, beside the sections that cite it
CITATION = re.compile(r"\[(@[\w:-]+(?:\s*;\s*@[\w:-]+)*)\]")
_ENTRY = re.compile(r"@(\w+)\s*\{\s*([\w:-]+)\s*,", re.MULTILINE)
_FIELD = re.compile(r"\s*(\w+)\s*=\s*")
# The same number pattern as helpers.reporting.check (a number standing alone, optionally signed).
_NUMBER = re.compile(r"(?<![\w.@/`])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w@/`]|\.\d)")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_REFERENCE = re.compile(r"\b(?:Table|Figure|Section) \d+\b")  # a paper's own numbering, no figure


@dataclass(frozen=True)
class Entry:
    key: str
    kind: str
    fields: dict = field(default_factory=dict)
    line: int = 0

    @property
    def published(self) -> tuple[str, ...]:
        """The published figures the prose may state when it cites this entry."""
        return tuple(v.strip() for v in self.fields.get("published", "").split(",") if v.strip())


def _value(text: str, start: int, path: Path, line: int) -> tuple[str, int]:
    """The field value beginning at ``text[start]`` and the index after it."""
    if text[start] == "{":
        depth, i = 0, start
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + 1 : i], i + 1
            i += 1
        raise InputError(f"{path}:{line}: unbalanced braces")
    if text[start] == '"':
        end = text.find('"', start + 1)
        if end < 0:
            raise InputError(f"{path}:{line}: unterminated quote")
        return text[start + 1 : end], end + 1
    match = re.match(r"\w+", text[start:])
    if not match:
        raise InputError(f'{path}:{line}: expected {{value}}, "value" or a number')
    return match[0], start + match.end()


def parse(text: str, path: Path) -> list[Entry]:
    """The entries of a BibTeX text (see the module's docstring for the subset read)."""
    text = "\n".join("" if line.lstrip().startswith("%") else line for line in text.splitlines())  # comments
    entries, seen = [], set()
    for match in _ENTRY.finditer(text):
        kind, key, i = match[1].lower(), match[2], match.end()
        line = text.count("\n", 0, match.start()) + 1
        if key in seen:
            raise InputError(f"{path}:{line}: duplicate key {key!r}")
        seen.add(key)
        values = {}
        while True:
            while i < len(text) and text[i] in " \t\n,":
                i += 1
            if i >= len(text) or text[i] == "}":
                break
            name = _FIELD.match(text, i)
            if not name:
                raise InputError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected `field = value` in {key!r}")
            value, i = _value(text, name.end(), path, line)
            values[name[1].lower()] = " ".join(value.split())
        for required in ("author", "title", "year"):
            if required not in values:
                raise InputError(f"{path}:{line}: entry {key!r} has no {required}")
        entries.append(Entry(key, kind, values, line))
    return entries


def read(folder: Path) -> tuple[Path, list[Entry]]:
    """``(path, entries)`` of the prose folder's ``references.bib``; no entries when it has none."""
    path = Path(folder) / BIB
    return path, parse(path.read_text(), path) if path.is_file() else []


def cited_keys(text: str) -> list[str]:
    """The keys ``text`` cites, in order of first citation."""
    keys = [k.strip().lstrip("@") for group in CITATION.findall(text) for k in group.split(";")]
    return list(dict.fromkeys(keys))


def check_citations(texts: dict[str, tuple[Path, str]], bib: Path, entries: list[Entry]) -> None:
    """Every ``[@key]`` of every prose file resolves to an entry of ``bib``, and every entry of
    ``bib`` is cited by some prose file; else a one-line InputError naming the file at fault."""
    known = {e.key for e in entries}
    cited = set()
    for path, body in texts.values():
        for key in cited_keys(body):
            if key not in known:
                raise InputError(f"{path}: unknown citation [@{key}]; {bib.name} has no such entry")
            cited.add(key)
    for entry in entries:
        if entry.key not in cited:
            raise InputError(f"{bib}:{entry.line}: entry {entry.key!r} is cited nowhere in {bib.parent}")


def numbering(text: str) -> dict[str, int]:
    """``{key: n}``: the entries numbered in order of their first citation in ``text``."""
    return {key: n for n, key in enumerate(cited_keys(text), start=1)}


def resolve_citations(text: str, entries: list[Entry]) -> tuple[str, dict[str, int]]:
    """``text`` with each ``[@a; @b]`` replaced by ``[1, 2]``, and the numbering used."""
    numbers = numbering(text)
    known = {e.key for e in entries}
    unknown = [k for k in numbers if k not in known]
    if unknown:
        raise InputError(f"unknown citation [@{unknown[0]}]; no entry of that key")

    def replace(match: re.Match) -> str:
        keys = [k.strip().lstrip("@") for k in match[1].split(";")]
        return "[" + ", ".join(str(numbers[k]) for k in keys) + "]"

    return CITATION.sub(replace, text), numbers


def _authors(text: str) -> str:
    names = [n.strip() for n in re.split(r"\s+and\s+", text) if n.strip()]
    if names and names[-1] == "others":
        return ", ".join(names[:-1]) + " et al."
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def format_entry(entry: Entry) -> str:
    """One bibliography line: authors. title. venue, details, year."""
    f = entry.fields
    venue = f.get("booktitle") or f.get("journal") or f.get("howpublished") or f.get("publisher") or ""
    details = ", ".join(
        part
        for part in (
            f"vol. {f['volume']}" if "volume" in f else "",
            f"no. {f['number']}" if "number" in f else "",
            f"pp. {f['pages'].replace('--', '–')}" if "pages" in f else "",
        )
        if part
    )
    tail = ", ".join(p for p in (f"*{venue}*" if venue else "", details, f["year"]) if p)
    note = f" {f['note']}." if "note" in f else ""
    return f"{_authors(f['author'])}. {f['title'].replace('{', '').replace('}', '')}. {tail}.{note}"


def bibliography_lines(entries: list[Entry], numbers: dict[str, int]) -> list[str]:
    """The References section's lines: the cited entries in order of their numbers."""
    by_key = {e.key: e for e in entries}
    ordered = sorted((n, k) for k, n in numbers.items())
    return [line for n, key in ordered for line in (f"[{n}] {format_entry(by_key[key])}", "")]


def unsourced_numbers(text: str, entries: list[Entry]) -> list[str]:
    """The numbers of ``text`` (written prose, with ``[@key]`` citations) that a sentence states
    without citing an entry that records them in its ``published`` field. Applied to the related
    work, whose numbers come from the literature, not from ``results/``."""
    by_key = {e.key: e for e in entries}
    found = []
    for sentence in _SENTENCE.split(text):
        sourced = {v for key in cited_keys(sentence) if key in by_key for v in by_key[key].published}
        found += [
            t for t in _NUMBER.findall(_REFERENCE.sub("", CITATION.sub("", sentence))) if t.lstrip("+") not in sourced
        ]
    return found
