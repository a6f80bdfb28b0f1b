"""The written parts of the paper and the talk: the sections a person writes in ``report/prose/``
(:func:`prose_names`), read from that one folder whatever the report's output folder
(:data:`PROSE_DIR`), and the numbering of the tables and figures they cite (``{tab:crop}`` /
``{fig:crop_curves}``: :func:`resolve_labels`).
"""

from __future__ import annotations

import re
from pathlib import Path

from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.experiments import study

# The paper's title: written like its sections; the HTML and the PDFs carry it too.
TITLE = "# Consumer-to-shop clothing retrieval: re-examining a course study's recipe"
AUTHORS = "Authors: <names> · <course, term>"  # placeholders the team fills in
PROSE_DIR = REPO_ROOT / "report" / "prose"  # the prose's one home; another only when asked for by name
PROSE_SECTIONS = (
    "abstract",
    "introduction",
    "related_work",
    "method",
    "discussion",
    "limitations",
    "running",  # "Running on DeepFashion": the full study's commands, around its generated plan
    "conclusion",
)
TALK = "talk.md"  # the slides: written, one message per slide, merged with generated figures and tables
# {tab:crop} / {fig:crop_curves} in prose: a reference; {def:tab:crop} in generated text: where Table N is.
_LABEL = re.compile(r"\{(tab|fig):(\w+)\}")
_DEFINITION = re.compile(r"\{def:(tab|fig):(\w+)\}")
_KIND = {"tab": "Table", "fig": "Figure"}


def prose_names() -> list[str]:
    """The markdown files ``report/prose/`` holds: one per written section, one findings file per
    stage, and the talk (:data:`TALK`)."""
    return [f"{s}.md" for s in PROSE_SECTIONS] + [f"findings_{stage}.md" for stage in study.STAGES] + [TALK]


def read_prose(folder: Path) -> dict[str, tuple[Path, str]]:
    """``{section: (file, text)}`` from ``folder``, which holds every file of :func:`prose_names`."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such prose folder; it must hold {', '.join(prose_names())}")
    texts = {}
    for name in prose_names():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: missing; {folder} needs {', '.join(prose_names())}")
        texts[name.removesuffix(".md")] = (path, path.read_text().strip())
    return texts


def prose_lines(texts: dict[str, tuple[Path, str]], section: str) -> list[str]:
    return [texts[section][1], ""] if section in texts else []


def resolve_labels(text: str, texts: dict[str, tuple[Path, str]]) -> str:
    """Number every ``{def:tab:x}`` / ``{def:fig:x}`` in order of appearance (Table 1, Figure 1, ...) and
    replace it and every ``{tab:x}`` / ``{fig:x}`` reference by its number; a prose file referring to a
    label no table or figure defines is an InputError naming that file."""
    numbers: dict[tuple[str, str], str] = {}
    for kind, name in _DEFINITION.findall(text):
        numbers[(kind, name)] = f"{_KIND[kind]} {sum(k == kind for k, _ in numbers) + 1}"
    for path, body in texts.values():
        for kind, name in _LABEL.findall(body):
            if (kind, name) not in numbers:
                known = ", ".join(f"{{{k}:{n}}}" for k, n in numbers)
                raise InputError(f"{path}: unknown label {{{kind}:{name}}}; known: {known}")
    text = _DEFINITION.sub(lambda m: numbers[(m[1], m[2])], text)
    return _LABEL.sub(lambda m: numbers[(m[1], m[2])], text)
