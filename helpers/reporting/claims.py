"""The claims table: each claim of the original study (:data:`CLAIMS`, in this project's words,
from ``docs/original_study.md``) beside the experiment of this study that asks it, the verdict the
committed results give (:func:`claim_rows`) and where it can be asked at all: on the offline
``demo`` profile, only under ``full`` (DeepFashion and hub weights), or not offline.

Verdicts are read, never made: from ``results/<profile>/<experiment>/comparison.csv`` through
:func:`helpers.experiments.family.effects` (a primary test's interval at the level of its Holm step,
an exploratory test's uncorrected 95 % interval, labelled so); a variant the committed results lack
(an experiment added or a level changed after they were written) reads "not run yet".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from helpers.experiments import catalogue, family
from helpers.reporting.tables import md_table

DEMO, FULL, OFFLINE = "tested on `demo`", "only under `full`", "not testable offline"


@dataclass(frozen=True)
class Claim:
    """A claim of the original study and the variants that answer it: ``experiment``'s
    ``variants`` against that experiment's baseline; ``expect`` is the verdict each variant gets
    if the claim holds (None: the original study only made the choice, it claimed no direction).
    ``did`` says what this study did when no experiment asks the claim, and ``place`` where it
    can be asked (:data:`FULL` or :data:`OFFLINE`; with an experiment, read from the catalogue)."""

    claim: str
    experiment: str | None = None
    variants: tuple[str, ...] = ()
    expect: str | None = None
    did: str = ""
    place: str | None = None


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "Its final recipe, EfficientNet-B3 + batch-hard triplet + 256-d, was the best combination it tried.",
        did="the `full` profile's baseline is that recipe; `loss`, `embed_dim` and `backbone` ask each part "
        "against its alternatives on DeepFashion (on `demo` the backbone is EfficientNet-Lite0)",
        place=FULL,
    ),
    Claim("Crop every photo to its garment box (it always cropped).", "crop", ("crop=False",), "worse"),
    Claim("A squash resize to a square is adequate (it squashed every crop).", "resize", ("resize=squash",)),
    Claim(
        "One input side, 224 px, for every backbone.", "resolution", ("img_size=128", "img_size=192", "img_size=224")
    ),
    Claim(
        "A preset of its augmentation ladder (weak / medium / strong / super_strong) is worth choosing.",
        "augment",
        ("augment=weak", "augment=medium", "augment=strong", "augment=super_strong"),
    ),
    Claim(
        "Growing the box by 0.1 of its size (its 'box gap') raised accuracy.", "margin", ("box_margin=0.1",), "better"
    ),
    Claim(
        "Gray-world white balance ('domain normalisation') raised accuracy.",
        "photometric",
        ("photometric=grayworld", "photometric=both"),
        "better",
    ),
    Claim("A BatchNorm head (Linear → BatchNorm → L2).", "head", ("head=bnneck",)),
    Claim(
        "Batch-hard triplet beat its semi-hard triplet loss (and InfoNCE).",
        "loss",
        ("loss=semi_hard", "loss=infonce"),
        "worse",
    ),
    Claim("256-d embeddings beat 512-d.", "embed_dim", ("embed_dim=512", "embed_dim=128"), "worse"),
    Claim("EfficientNet-B3 beat ResNet-34.", "backbone", ("backbone=resnet34",), "worse"),
    Claim(
        "Test Recall@1 0.6402 (Recall@5 0.7280, Recall@10 0.7751) on its DeepFashion sample.",
        did="no rerun can check it offline: DeepFashion, and its pair-row protocol (`docs/original_study.md`); "
        "`04_demo` under `full` prints our `original_pairs` row beside it, the only comparable number",
        place=OFFLINE,
    ),
)


def where(claim: Claim) -> str:
    """Where the claim can be asked: the first profile whose catalogue holds one of its variants."""
    for profile, label in (("demo", DEMO), ("full", FULL)):
        found = {e.name: e for e in catalogue.experiments(profile)}.get(claim.experiment)
        if found and any(v in found.variants for v in claim.variants):
            return label
    return claim.place or OFFLINE


def _verdict(row: pd.Series) -> str:
    interval = f"{row['diff']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"
    label = "at Holm's level" if row["role"] == "primary" else "exploratory, uncorrected 95 %"
    return f"{row['verdict']}, {interval} ({label})"


def _assessment(verdicts: list[str], expect: str | None) -> str:
    """What the run variants' verdicts say of a claim that expects ``expect`` of each."""
    if expect is None or not verdicts:
        return ""
    opposite = {"better": "worse", "worse": "better"}[expect]
    if opposite in verdicts:
        return "contradicted"
    if all(v == expect for v in verdicts):
        return "supported"
    return "not confirmed (within noise)" if expect not in verdicts else "partly supported"


def claim_rows(roots: dict[str, Path]) -> pd.DataFrame:
    """One row per claim of :data:`CLAIMS`: the claim, what this study did, the verdict of each of
    its variants in the committed results of the profile that asks it (``roots``:
    ``{profile: results/<profile>}``; "not run yet" where they lack it), and where it can be tested."""
    effects = {profile: family.effects(profile, root) for profile, root in roots.items()}
    rows = []
    for claim in CLAIMS:
        place = where(claim)
        profile = {DEMO: "demo", FULL: "full"}.get(place)
        catalogued = {e.name: e for e in catalogue.experiments(profile)} if profile else {}
        experiment = catalogued.get(claim.experiment)
        if experiment is None:
            did, verdict = claim.did, "not run yet" if place == FULL else "—"
        else:
            found = effects.get(profile, pd.DataFrame(columns=["experiment", "variant"]))
            found = found[found.experiment == experiment.name].set_index("variant")
            # the catalogue's variants, and those the committed results hold (an earlier level)
            variants = [v for v in claim.variants if v in experiment.variants or v in found.index]
            did = f"`{experiment.name}`: " + ", ".join(f"`{v}`" for v in variants) + " against its baseline"
            cells, run = [], []
            for v in variants:
                if v in found.index:
                    cells.append(f"`{v}`: {_verdict(found.loc[v])}")
                    run.append(found.loc[v, "verdict"])
                else:
                    cells.append(f"`{v}`: not run yet")
            assessment = _assessment(run, claim.expect)
            verdict = "; ".join(cells) + (f"; the claim: {assessment}" if assessment else "")
        rows.append(
            {
                "claim of the original study": claim.claim,
                "what this study did": did,
                "verdict (val Recall@5 difference, interval)": verdict,
                "where": place,
            }
        )
    return pd.DataFrame(rows)


def claims_lines(roots: dict[str, Path], data_source: str, tag: str = "") -> list[str]:
    """The claims table with its caption (``{def:tab:claims}``)."""
    return [
        f"*{{def:tab:{tag}claims}}: the original study's claims (in our words; `docs/original_study.md`), the "
        "experiment of this study that asks each, and the verdict of the committed results on val Recall@5 "
        "against that experiment's baseline: the difference with its interval (primary: at the level of its Holm "
        f'step; exploratory: uncorrected 95 %, labelled); data: {data_source}. "Not run yet": the committed '
        "results predate that variant. Where: what the question needs, the offline `demo` profile, "
        "DeepFashion with hub weights (`full`), or more than a rerun.*",
        "",
        md_table(claim_rows(roots)),
        "",
    ]
