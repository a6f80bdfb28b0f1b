"""The talk: the written ``report/prose/talk.md`` (one ``---`` between slides), each
``[[figure NAME]]`` / ``[[table NAME]]`` line filled in from the first profile's results
(:func:`talk_slides`), so the talk can never disagree with the runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.experiments import study
from helpers.reporting.prose import _LABEL
from helpers.reporting.tables import data_table, md_table, mean_std, with_ci

# A line of the talk that is only `[[figure NAME]]` or `[[table NAME]]`: replaced by what it names.
_DIRECTIVE = re.compile(r"^\[\[(figure|table) (\w+)\]\]$", re.MULTILINE)
SCREENSHOT = REPO_ROOT / "05_live_demo" / "screenshot.jpg"


def talk_tables(loaded: dict) -> dict[str, pd.DataFrame]:
    """The small tables a slide may show, from the first profile's results."""
    tables = {"data": data_table(loaded["summary"])[["split", "items", "consumer images", "shop images"]]}
    tables["design"] = pd.DataFrame(  # what was run: each finished experiment's variants
        [
            {
                "stage": f"`{e.stage}`",
                "question": e.question.split("?")[0] + "?",
                "variants (vs the baseline)": ", ".join(v for v in result["comparison"].index if v != "baseline"),
                "seeds": len(result["decision"]["seeds"]),
            }
            for e, result in loaded["finished"]
        ]
    )
    metrics_path = loaded["root"] / "final" / "metrics.json"
    if metrics_path.is_file():
        final = json.loads(metrics_path.read_text())
        rows = []
        for model, seeds in (("final", final.get("seeds")), ("default recipe", final.get("default_recipe_seeds"))):
            if seeds:
                mean, std, n = seeds["mean"], seeds["std"], len(seeds) - 2
                rows.append(
                    {
                        "model": f"{model} ({n} seeds)",
                        **{
                            f"test R@{k}": mean_std(mean[f"test_recall@{k}"], std[f"test_recall@{k}"]) for k in study.KS
                        },
                    }
                )
        if not rows:
            official = final["protocols"]["official"]
            rows.append(
                {"model": "final (one run)", **{f"test R@{k}": with_ci(official, f"recall@{k}") for k in study.KS}}
            )
        zero = final.get("zero_shot")
        if zero:
            rows.append(
                {"model": "zero-shot backbone", **{f"test R@{k}": f"{zero[f'recall@{k}']:.3f}" for k in study.KS}}
            )
        tables["final"] = pd.DataFrame(rows)
    return tables


def talk_figures(loaded: dict, figures: Path) -> dict[str, str]:
    """Figure name → its file under ``figures/`` (written by the report before the talk)."""
    found = {"pipeline": "pipeline.png"}
    prefix = f"{loaded['profile']}_"
    for path in sorted(figures.glob(f"{prefix}*.png")):
        found[path.stem.removeprefix(prefix)] = path.name
    if SCREENSHOT.is_file():
        (figures / SCREENSHOT.name).write_bytes(SCREENSHOT.read_bytes())
        found["screenshot"] = SCREENSHOT.name
    return found


def talk_slides(talk: tuple[Path, str], loaded: dict, figures: Path) -> list[str]:
    """The slides of the written talk (``---`` between slides), each ``[[figure NAME]]`` /
    ``[[table NAME]]`` line replaced by that figure or table; a name not known is an
    InputError naming the talk's file and line."""
    path, text = talk
    label = _LABEL.search(text)
    if label:
        raise InputError(f"{path}: {label[0]} is a label of the paper; a slide shows its own: [[figure NAME]]")
    tables, images = talk_tables(loaded), talk_figures(loaded, figures)

    def replace(match: re.Match) -> str:
        kind, name = match[1], match[2]
        known = images if kind == "figure" else tables
        if name not in known:
            line = text[: match.start()].count("\n") + 1
            raise InputError(f"{path}:{line}: unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
        return f"![{name}](figures/{known[name]})" if kind == "figure" else md_table(known[name])

    return [slide.strip() for slide in re.split(r"\n---\n", _DIRECTIVE.sub(replace, text))]
