"""The prose held to the results twice: its numbers must occur in a file under ``results/`` at the
precision printed (:func:`untraceable_numbers`), and its words of direction (better, worse, ...)
must agree with the experiments' verdicts (:func:`contradictions`). The tests apply both to the
report, the written sections and the notebooks' closing words.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from helpers.experiments import study

# A number standing alone: not part of a word, identifier, path or version ("R@5", "02_1",
# "lite0", "2.14.1", "sha256"), optionally signed.
_NUMBER = re.compile(r"(?<![\w.@/`])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w@/`]|\.\d)")
# in prose a number may group its thousands ("2,868 queries"): one number, compared without commas
_PROSE_NUMBER = re.compile(
    r"(?<![\w.@/`])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w@/`]|\.\d)"
)


def _forms(value: float) -> set[str]:
    """The ways a number may be printed: rounded to 0..6 decimals, with and without a sign."""
    out = set()
    for digits in range(7):
        text = f"{value:.{digits}f}"
        out |= {text, text.lstrip("+"), f"{value:+.{digits}f}"}
    return out


def result_numbers(results: Path) -> set[str]:
    """Every printed form of every number in the CSV and JSON files under ``results``."""
    found: set[str] = set()
    for path in sorted(Path(results).rglob("*")):
        if path.suffix in (".csv", ".json") and path.is_file():
            for token in set(_NUMBER.findall(path.read_text())):
                found |= _forms(float(token))
    return found


# A reference's number (Table 3, Figure 12, the heading "## 4 Results") counts tables, not results.
_REFERENCE = re.compile(r"\b(?:Table|Figure|Section) \d+\b|^#+ \d+(?= )", re.MULTILINE)


def untraceable_numbers(text: str, results: Path) -> list[str]:
    """The numbers in ``text`` that occur in no file under ``results`` at the precision printed
    (references to tables, figures and sections aside)."""
    known = result_numbers(results)
    tokens = _PROSE_NUMBER.findall(_REFERENCE.sub("", text))
    return [
        token
        for token in tokens
        if token.replace(",", "") not in known and token.replace(",", "").lstrip("+") not in known
    ]


# --------------------------------------------------------------------------- prose against verdicts

POSITIVE = re.compile(r"\b(?:better|gains?|improve[sd]?|improvements?|helps?|helped|outperform(?:s|ed)?)\b", re.I)
NEGATIVE = re.compile(r"\b(?:worse|hurts?|drops?|dropped|degrade[sd]?)\b", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_METRIC = re.compile(r"\b(?:R|Recall)@(\d+)\b")


def verdicts(root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """``{experiment: {variant: {metric: verdict}}}`` of every finished experiment under ``root``:
    Recall@5's over the whole Holm family once the study has finished (``verdict_final_recall@5``,
    as the tables and the ranked effects give it), else at the experiment's decision."""
    found = {}
    for path in sorted(root.glob("*/decision.json")):
        comparison = study.load_experiment(root, path.parent.name)["comparison"]
        columns = [c for c in comparison.columns if c.startswith("verdict_recall@")]
        final = f"verdict_final_{study.PRIMARY}"
        found[path.parent.name] = {
            variant: {
                c.removeprefix("verdict_"): row[final]
                if c == f"verdict_{study.PRIMARY}" and final in row and pd.notna(row[final])
                else row[c]
                for c in columns
            }
            for variant, row in comparison.iterrows()
            if row[f"verdict_{study.PRIMARY}"] != "baseline"  # the reference row, `none` in postprocess
        }
    return found


def contradictions(text: str, table: dict[str, dict[str, dict[str, str]]]) -> list[str]:
    """The sentences of ``text`` whose direction words contradict a verdict. A sentence naming a
    variant (``img_size=128``) or an experiment in backticks (`` `resolution` ``) and a direction word
    (better, gain, improves, helps, outperforms / worse, hurts, drops, degrades) must agree with the
    verdict on every Recall@K the sentence names (Recall@5, the deciding metric, when it names none):
    every named variant must have that verdict, and a named experiment at least one variant with it.
    A `within noise` variant is thus never a gain or a loss, and one sentence holds one direction.
    Strict on purpose: a negation ("not better") counts as the word."""
    wrong = []
    for sentence in (s.strip() for s in _SENTENCE.split(text) if s.strip()):
        up, down = bool(POSITIVE.search(sentence)), bool(NEGATIVE.search(sentence))
        if not (up or down):
            continue
        metrics = [f"recall@{k}" for k in dict.fromkeys(_METRIC.findall(sentence))] or [study.PRIMARY]

        def agrees(verdict: dict[str, str]) -> bool:
            found = {verdict.get(m) for m in metrics}
            return found == {"better"} if up and not down else found == {"worse"} if down and not up else False

        for experiment, variants in table.items():
            named = [v for v in variants if re.search(rf"(?<![\w.=]){re.escape(v)}(?![\w.])", sentence)]
            if named and not all(agrees(variants[v]) for v in named):
                wrong.append(sentence)
                break
            if not named and f"`{experiment}`" in sentence and not any(map(agrees, variants.values())):
                wrong.append(sentence)
                break
    return wrong
