"""The repository's prose held to the config and the committed results: every notebook's markdown
cells, ``README.md``, ``docs/*.md`` and the written sections and talk of ``report/prose/``
(:func:`stale_statements`). :mod:`helpers.reporting.check` holds the report to ``results/``; this
module holds everything else a reader meets, with three rules.

**1. Settings stated in words** (:data:`SETTINGS`): ``N seeds`` (digits or two…twelve), ``N epochs``
/ ``N-epoch``, ``N px`` / ``N×N px`` (an input side: not after "than", "most", "least", "under",
"over", "by" nor before "past", "beyond", "off", "outside"), ``N [train|val|test] items`` and
``N [val|test] [consumer] queries``. Each number must be *true somewhere* in the context the
sentence speaks of (:func:`facts`):

* ``demo`` (the default): the demo profile's config (``STUDY_SEEDS``, ``EXPLORATORY_SEEDS``,
  ``epochs``, ``patience``, ``DEMO_EPOCHS``, ``img_size``, ``synthetic_items``,
  ``synthetic_splits``, ``stop_items`` and the val items the study compares, ``p_items``) and the
  committed results under ``results/demo``: each ``runs.csv`` (seeds per variant, ``epochs_run``,
  ``img_size``, ``val_n_queries``), ``comparison.csv`` (``n_seeds``), ``decision.json`` (its
  seeds), ``data_summary.json`` (items and consumer images per split, their sum),
  ``final_config.json`` (``img_size``, the baseline recipe's ``epochs`` and ``patience``),
  ``noise.csv`` / ``power_plan.csv`` (seeds, items, queries) and ``final/metrics.json``
  (``n_queries``);
* ``full`` / ``fixture``, when the sentence names that profile: that profile's config (and, for
  ``full``, the pretrained input sides of its backbones, :data:`PRETRAINED_SIDES`, and its
  resolution variant);
* ``original``, when it names the original study: :data:`ORIGINAL_STUDY`, a small table of what
  that study did; quantities the table lacks (seeds, queries) are not checked there;
* the recipe benchmark's independent tree (``tests/independent_tree.py``,
  ``benchmarks/recipes.py``): its facts live under ``benchmarks/results/``, which this check does
  not read, so its sentences are not checked.

A sentence takes the contexts it names; one that names none takes those of its paragraph (a list
item or table row: its own, else those of the paragraph that introduces the list); a paragraph
that names none is ``demo``. A number true in any of the contexts taken passes.

**2. Dismissals** (:data:`DISMISSAL`): "no effect", "does not matter / help / bridge", "makes no
difference", "no difference", "plateau", "confirms / confirmed", "negligible", "irrelevant" (a
phrase in quotation marks is a mention, not a use: ``"Within noise" is not "no effect"``). A
sentence with one that names a comparison (a variant such as ``img_size=128`` or an experiment in
backticks, or an experiment's plain words, :data:`ALIASES`) must have, for every variant named
(every variant of a named experiment), its Recall@5 interval inside ± the effect dismissed: the
interval its verdict was read from (``role_recall@5`` primary: ``low_adj`` / ``high_adj``, their
``_final`` columns when the finished family wrote them; exploratory: ``low`` / ``high``) must lie
within ± ``mde_recall@5`` (the minimum detectable effect at level 0.05), or within ± the size
the sentence states ("no effect larger than 0.05"). "Within noise" is no dismissal. A better or
worse verdict's interval excludes 0 beyond the MDE, so a dismissal of it is flagged as well.

**3. References**: a markdown link or image (``[text](path)``, not ``http…`` / ``mailto:``) must
point at a file or folder that exists (relative to the file; ``#anchor`` aside), and a capitalised
``Figure N`` / ``Table N`` / ``Section N`` must exist in ``report/report.md`` (its numbered
captions ``*Figure N: …*`` / ``*Table N: …*`` and headings ``## N …``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from helpers.core import config as config_module
from helpers.core.config import PROFILES

# ----------------------------------------------------------------------------- facts

# What the original study did (docs/original_study.md), in this project's words: it squashed
# every box crop to a 224×224 square, trained at most 40 epochs with early stopping after 5
# without a better val metric, used a batch-hard margin of 0.5 and Adam at 1e-4, sampled
# 1221 / 124 / 122 items (train / val / test) of TOPS + DRESSES, and published test Recall@1/5/10
# 0.6402 / 0.7280 / 0.7751.
ORIGINAL_STUDY = {
    "px": {224},
    "epochs": {40, 5},  # the most it trained; its patience
    "items": {"train": {1221}, "val": {124}, "test": {122}},
    "margin": 0.5,
    "lr": 1e-4,
    "published": {"recall@1": 0.6402, "recall@5": 0.7280, "recall@10": 0.7751},
}

# The input side (px) at which timm's pretrained weights of the full profile's CNN backbones were
# trained; `img_size` None under `full` means "this side" (tests/test_consistency.py checks it
# against timm's pretrained configs).
PRETRAINED_SIDES = {"efficientnet_b3": 288, "resnet34": 224}

NUMBER_WORDS = {w: i for i, w in enumerate("two three four five six seven eight nine ten eleven twelve".split(), 2)}
_NUM = r"(\d{1,3}(?:,\d{3})+|\d+|" + "|".join(NUMBER_WORDS) + r")"
SPLIT_WORD = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}

# The phrases of rule 1, each with its unit; group 1 the number, group 2 the split (if any).
SETTINGS = {
    "seeds": re.compile(rf"(?<![\w.–-])()(?:{_NUM})\s+seeds?\b", re.I),
    "epochs": re.compile(rf"(?<![\w.–-]){_NUM}(?:\s+|-)epochs?\b", re.I),
    "px": re.compile(
        r"(?<!than )(?<!most )(?<!least )(?<!under )(?<!over )(?<!by )(?<![\w.])(\d+)(?:\s?[×x]\s?\d+)?\s?px\b"
        r"(?!\s+(?:past|beyond|off|outside))"
    ),
    "items": re.compile(rf"(?<![\w.–-]){_NUM}\s+(?:(train|training|val|validation|test)\s+)?(?:synthetic\s+)?items\b"),
    "queries": re.compile(rf"(?<![\w.–-]){_NUM}\s+(?:(val|test)\s+)?(?:consumer\s+)?queries\b"),
}
# The seeds pattern has an empty group 1 so that every pattern's number is its last-but-split group.

CONTEXTS = {
    # unchecked: measurements whose settings are their scripts' (benchmarks/results/, simulations)
    "benchmark": re.compile(r"simulat|one-off check|benchmarks/bench_|bench_\w+\.py", re.I),
    "independent": re.compile(
        r"independent[ -](?:DeepFashion-format )?tree|independent_tree|benchmarks/recipes|results/recipes|candidate_20",
        re.I,
    ),
    "original": re.compile(r"original study|original_pairs|ORIGINAL_", re.I),
    "full": re.compile(r"`full`|\bfull profile|profile full|--profile full|C2S_PROFILE=full"),
    "fixture": re.compile(r"`fixture`|\bfixture (?:profile|model)|profile fixture"),
    "demo": re.compile(r"`demo`|\bdemo profile|profile demo|--profile demo|make demo|results/demo"),
}
UNCHECKED = {"benchmark", "independent"}
# Files whose every statement is a measurement of benchmarks/*.py at the script's own settings.
FILE_CONTEXTS = {"docs/benchmarks.md": {"benchmark"}}
# Files about something else than the demo study: their sentences that name no context speak of it.
FILE_DEFAULTS = {"docs/original_study.md": {"original"}}


def _number(text: str) -> int:
    return NUMBER_WORDS.get(text.lower()) or int(text.replace(",", ""))


def _ints(values) -> set[int]:
    out = set()
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f == f and f == int(f):
            out.add(int(f))
    return out


def _profile_facts(profile: str) -> dict:
    cfg = PROFILES[profile]
    seeds = {
        config_module.STUDY_SEEDS[profile],
        *([config_module.EXPLORATORY_SEEDS[profile]] if hasattr(config_module, "EXPLORATORY_SEEDS") else []),
        *getattr(config_module, "RESIZED_SEEDS", {}).get(profile, {}).values(),
    }
    epochs = {
        cfg.epochs,
        cfg.patience,
        cfg.warmup_epochs,
        getattr(config_module, "DEMO_EPOCHS", {}).get(profile, cfg.epochs),
    }
    items = {"train": set(), "val": set(), "test": set(), "any": {cfg.synthetic_items, cfg.p_items}}
    splits = getattr(cfg, "synthetic_splits", None)
    if splits:
        for name, n in zip(("train", "val", "test"), splits):
            items[name].add(n)
        stop = getattr(cfg, "stop_items", 0)
        if stop:
            items["val"] |= {stop, splits[1] - stop}
    px = {cfg.img_size} if cfg.img_size else set()
    return {"seeds": seeds, "epochs": epochs, "px": px, "items": items, "queries": {"any": set()}}


def facts(results_root: Path) -> dict[str, dict]:
    """``{context: {quantity: values}}`` (items and queries: ``{split or 'any': values}``)."""
    demo = _profile_facts("demo")
    root = Path(results_root) / "demo"
    for path in sorted(root.glob("*/runs.csv")):
        runs = pd.read_csv(path)
        if "seed" in runs and "variant" in runs:
            demo["seeds"] |= _ints(runs.groupby("variant")["seed"].nunique())
        demo["epochs"] |= _ints(runs.get("epochs_run", []))
        demo["px"] |= _ints(runs.get("img_size", []))
        demo["queries"].setdefault("val", set()).update(_ints(runs.get("val_n_queries", [])))
    for path in sorted(root.glob("*/comparison.csv")):
        demo["seeds"] |= _ints(pd.read_csv(path).get("n_seeds", []))
    for path in sorted(root.glob("*/decision.json")):
        demo["seeds"].add(len(json.loads(path.read_text()).get("seeds", [])))
    summary_path = root / "data_summary.json"
    if summary_path.is_file():
        splits = json.loads(summary_path.read_text()).get("splits", {})
        for name, row in splits.items():
            demo["items"].setdefault(name, set()).add(row.get("items"))
            demo["queries"].setdefault(name, set()).add(row.get("consumer_images"))
        demo["items"]["any"].add(sum(row.get("items", 0) for row in splits.values()))
    final_path = root / "final_config.json"
    if final_path.is_file():
        final = json.loads(final_path.read_text())
        demo["px"] |= _ints([final.get("config", {}).get("img_size")])
        recipe = final.get("baseline_recipe", {})
        demo["px"] |= _ints([recipe.get("img_size")])
        demo["epochs"] |= _ints([recipe.get("epochs"), recipe.get("patience")])
    for name, seeds, items, queries in (
        ("noise.csv", "n_seeds", "n_items", "n_queries"),
        ("power_plan.csv", "seeds", "val_items", None),
    ):
        if (root / name).is_file():
            table = pd.read_csv(root / name)
            demo["seeds"] |= _ints(table.get(seeds, []))
            demo["items"]["val"] |= _ints(table.get(items, []))
            if queries:
                demo["queries"]["val"] |= _ints(table.get(queries, []))
    metrics = root / "final" / "metrics.json"
    if metrics.is_file():
        demo["queries"].setdefault("test", set()).update(
            _ints(re.findall(r'"n_queries":\s*(\d+)', metrics.read_text()))
        )
    full, fixture = _profile_facts("full"), _profile_facts("fixture")
    full["px"] |= set(PRETRAINED_SIDES.values()) | {224}  # the full resolution variant and DINOv2 arm: 224
    original = {"px": ORIGINAL_STUDY["px"], "epochs": ORIGINAL_STUDY["epochs"], "items": dict(ORIGINAL_STUDY["items"])}
    original["items"]["any"] = set().union(*ORIGINAL_STUDY["items"].values()) | {
        sum(min(v) for v in ORIGINAL_STUDY["items"].values())
    }
    return {"demo": demo, "full": full, "fixture": fixture, "original": original}


def _allowed(context: dict, quantity: str, split: str | None) -> set[int] | None:
    """The values of ``quantity`` true in ``context``; None when the context has no such facts."""
    values = context.get(quantity)
    if values is None:
        return None
    if isinstance(values, dict):
        if split:
            return {v for v in values.get(split, set()) if v is not None}
        return {v for group in values.values() for v in group if v is not None}
    return {v for v in values if v is not None}


# ----------------------------------------------------------------------------- reading the prose


@dataclass
class Sentence:
    path: str  # as shown: relative to the repository, plus ":cellN" for a notebook
    line: int  # 1-based line of the sentence's start (in its cell for a notebook)
    text: str
    topic: str  # the first sentence of its paragraph (or list item / table row)
    lead: str  # the first sentence of the paragraph that introduces a list item or table row ('' otherwise)


_FENCE = re.compile(r"^\s*(```|~~~)")
_LIST_OR_ROW = re.compile(r"^\s*(?:[*+-]\s|\d+\.\s|\|)")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[^a-z0-9])")


def _blocks(text: str) -> Iterator[tuple[int, str, bool]]:
    """``(first line, text, is list item / table row)`` of each paragraph, fenced code left out."""
    fenced, current, start, listy = False, [], 0, False
    for number, line in enumerate(text.split("\n"), 1):
        if _FENCE.match(line):
            fenced = not fenced
            line = ""
        if fenced:
            line = ""
        if not line.strip() or _LIST_OR_ROW.match(line) or line.lstrip().startswith("#"):
            if current:
                yield start, " ".join(current), listy
            current, listy = ([], False) if not line.strip() else ([line.strip()], bool(_LIST_OR_ROW.match(line)))
            start = number
            if line.lstrip().startswith("#"):
                yield start, line.strip(), False
                current = []
            continue
        if not current:
            start = number
        current.append(line.strip())
    if current:
        yield start, " ".join(current), listy


def _first_sentence(block: str) -> str:
    return next((p for p in _SPLIT.split(block) if p.strip()), "")


def sentences(text: str, shown: str) -> list[Sentence]:
    """The sentences of a markdown text, each with its line, its block's topic (first) sentence and,
    for a list item or table row, the topic sentence of the paragraph introducing it (a heading
    ends a paragraph's reach)."""
    out, lead = [], ""
    lines = text.split("\n")
    for start, block, listy in _blocks(text):
        if block.startswith("#"):
            lead = ""
            continue
        if not listy:
            lead = _first_sentence(block)
        for part in (p for p in _SPLIT.split(block) if p.strip()):
            probe, line = part.strip()[:12], start
            for n in range(start, len(lines) + 1):
                if probe in lines[n - 1]:
                    line = n
                    break
            out.append(Sentence(shown, line, part.strip(), _first_sentence(block), lead if listy else ""))
    return out


def _markdown_sources(repo: Path) -> Iterator[tuple[str, str]]:
    """``(shown path, markdown text)`` of README, docs, report/prose and every notebook's markdown cell."""
    for path in [
        repo / "README.md",
        *sorted((repo / "docs").glob("*.md")),
        *sorted((repo / "report" / "prose").glob("*.md")),
    ]:
        if path.is_file():
            yield str(path.relative_to(repo)), path.read_text()
    for path in sorted(repo.glob("0*/*.ipynb")):
        cells = json.loads(path.read_text()).get("cells", [])
        for i, cell in enumerate(cells):
            if cell.get("cell_type") == "markdown":
                source = cell.get("source", "")
                yield f"{path.relative_to(repo)}:cell{i}", "".join(source) if isinstance(source, list) else source


# ----------------------------------------------------------------------------- rule 1


def _contexts(sentence: Sentence, file_contexts: set[str] = frozenset(), default: set[str] = frozenset()) -> set[str]:
    """The contexts a sentence's numbers are checked in: those its file is (:data:`FILE_CONTEXTS`),
    else those the sentence names, else its paragraph's topic sentence, else its list's lead, else
    its file's default (:data:`FILE_DEFAULTS`), else demo. The original study is named beside this study's own numbers so often
    ("the original study's squash is within noise of the letterbox at 160 px") that demo stays
    admitted beside it."""
    if file_contexts:
        return set(file_contexts)
    for text in (sentence.text, sentence.topic, sentence.lead):
        named = {name for name, pattern in CONTEXTS.items() if pattern.search(text)}
        if named:
            return named | {"demo"} if "original" in named else named
    return set(default) or {"demo"}


_LINK_TARGET = re.compile(r"\]\([^)]*\)")


def stale_settings(
    sentence: Sentence, known: dict[str, dict], file_contexts: set[str] = frozenset(), default: set[str] = frozenset()
) -> list[str]:
    """Rule 1 on one sentence: each setting it states, true in none of its contexts."""
    contexts = _contexts(sentence, file_contexts, default)
    if contexts & UNCHECKED:
        return []
    text = _LINK_TARGET.sub("]", sentence.text)
    problems = []
    for quantity, pattern in SETTINGS.items():
        for match in pattern.finditer(text):
            groups = match.groups()
            number = _number(groups[1] if quantity == "seeds" else groups[0])
            split = SPLIT_WORD.get((groups[1] or "").lower()) if quantity in ("items", "queries") else None
            checked = [a for a in (_allowed(known[c], quantity, split) for c in contexts) if a is not None]
            if checked and not any(number in a for a in checked):
                where = "/".join(sorted(contexts))
                problems.append(
                    f"'{match.group(0)}' is true nowhere in {where} (known: {sorted(set().union(*checked))})"
                )
    return problems


# ----------------------------------------------------------------------------- rule 2

DISMISSAL = re.compile(
    r"\bno (?:measurable |real )?effect\b|\b(?:does|do|did)(?: not|n't) (?:matter|help|bridge)\b|"
    r"\bmakes? no difference\b|\bmade no difference\b|\bno difference\b|\bplateau\b|\bconfirm(?:s|ed)?\b|"
    r"\bnegligible\b|\birrelevant\b",
    re.I,
)
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")
_STATED = re.compile(r"\b(?:larger|greater|bigger|more) than (\d?\.\d+)")

# Plain words that name an experiment (besides its name in backticks and its variants).
ALIASES = {
    "crop": r"\bcrop(?:ping|ped)?\b|whole photo",
    "resize": r"\bsquash|\bletterbox",
    "resolution": r"\binput (?:side|size)|\bresolution\b|\b\d+ px\b",
    "augment": r"\baugmentation\b",
    "margin": r"\bbox margin|\bbox gap",
    "photometric": r"\bcolou?r normali[sz]ation|\bphotometric|\bdomain normali[sz]ation|\bgr[ae]y-?world|\bCLAHE\b",
    "head": r"\bBNNeck\b",
    "loss": r"\bsemi-hard\b",
    "embed_dim": r"\bembedding (?:size|dimension)",
    "backbone": r"\bLite1\b|\blarger backbone",
    "postprocess": r"\bpost-processing|\bre-ranking|\bquery expansion|\btest-time augmentation|\bflip TTA",
}


def comparisons(results_root: Path) -> dict[str, pd.DataFrame]:
    """Each finished experiment's ``comparison.csv`` under ``results_root/demo``, by variant."""
    found = {}
    for path in sorted((Path(results_root) / "demo").glob("*/comparison.csv")):
        if (path.parent / "decision.json").is_file():
            table = pd.read_csv(path)
            if "variant" in table and "verdict_recall@5" in table:
                found[path.parent.name] = table[table["verdict_recall@5"] != "baseline"].set_index("variant")
    return found


def dismissed_interval(row: pd.Series) -> tuple[float, float, float]:
    """``(low, high, mde)`` of a comparison row as rule 2 reads it."""
    exploratory = str(row.get("role_recall@5", "primary")) == "exploratory"
    if exploratory:
        low, high = row["low_recall@5"], row["high_recall@5"]
    elif pd.notna(row.get("low_adj_final_recall@5")) and pd.notna(row.get("high_adj_final_recall@5")):
        low, high = row["low_adj_final_recall@5"], row["high_adj_final_recall@5"]
    else:
        low, high = row["low_adj_recall@5"], row["high_adj_recall@5"]
    return float(low), float(high), float(row["mde_recall@5"])


def unsupported_dismissals(sentence: str, table: dict[str, pd.DataFrame]) -> list[str]:
    unquoted = _QUOTED.sub("", sentence)
    if not DISMISSAL.search(unquoted):
        return []
    stated = _STATED.search(unquoted)
    problems = []
    for experiment, rows in table.items():
        named = [v for v in rows.index if re.search(rf"(?<![\w.=]){re.escape(v)}(?![\w.])", unquoted)]
        if not named and (f"`{experiment}`" in unquoted or re.search(ALIASES.get(experiment, r"$^"), unquoted, re.I)):
            named = list(rows.index)
        for variant in named:
            low, high, mde = dismissed_interval(rows.loc[variant])
            bound = float(stated.group(1)) if stated else mde
            if not (-bound <= low and high <= bound):
                problems.append(
                    f"dismisses `{variant}` ({DISMISSAL.search(unquoted).group(0)!r}) but its interval "
                    f"[{low:+.3f}, {high:+.3f}] is not within ±{bound:.3f}"
                )
    return problems


# ----------------------------------------------------------------------------- rule 3

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF = re.compile(r"\b(Figure|Table|Section) (\d+)\b")


def report_numbers(report: Path) -> dict[str, set[int]]:
    text = report.read_text() if report.is_file() else ""
    return {
        "Figure": {int(n) for n in re.findall(r"^\*Figure (\d+):", text, re.M)},
        "Table": {int(n) for n in re.findall(r"^\*Table (\d+):", text, re.M)},
        "Section": {int(n) for n in re.findall(r"^## (\d+) ", text, re.M)},
    }


def broken_references(text: str, base: Path, numbers: dict[str, set[int]]) -> list[str]:
    problems = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if path and not (base / path).exists():
            problems.append(f"link target {target!r} does not exist")
    for kind, number in _REF.findall(_LINK_TARGET.sub("]", text)):
        if int(number) not in numbers[kind]:
            problems.append(f"'{kind} {number}' is not in report/report.md")
    return problems


# ----------------------------------------------------------------------------- all together


def stale_statements(repo_root: Path, results_root: Path) -> list[str]:
    """``"file:line: reason"`` for every statement of the repository's prose that breaks rule 1, 2 or 3."""
    repo, results_root = Path(repo_root), Path(results_root)
    known, table = facts(results_root), comparisons(results_root)
    numbers = report_numbers(repo / "report" / "report.md")
    problems = []
    for shown, text in _markdown_sources(repo):
        base = (repo / shown.split(":cell")[0]).parent
        for sentence in sentences(text, shown):
            reasons = stale_settings(
                sentence, known, FILE_CONTEXTS.get(shown, set()), FILE_DEFAULTS.get(shown, set())
            ) + unsupported_dismissals(sentence.text, table)
            reasons += broken_references(sentence.text, base, numbers)
            problems += [f"{shown}:{sentence.line}: {reason}" for reason in reasons]
    return problems
