"""The study's catalogue: its experiments (questions, variants, stages), the written rule that
adopts a variant, and what each experiment varies.

An **experiment** is a named baseline configuration plus variants (each a few config
overrides), run for N seeds. The baseline of an experiment is its **stage baseline**: the
profile's own config (its default recipe) plus the winners of every earlier stage, so stage 2
builds on what stage 1 adopted and ``03`` on both. Stages and their experiments:

========  =====================================================================
stage     experiments (:func:`experiments`)
========  =====================================================================
``02_1``  ``crop`` (box crop vs whole photo), ``resize`` (letterbox vs squash),
          ``resolution`` (input side)
``02_2``  ``augment`` (presets), ``margin`` (box margin), ``photometric``
          (none / clahe / grayworld / both), ``head`` (bn / bnneck)
``03``    ``loss`` (batch_hard / semi_hard / infonce), ``embed_dim``,
          ``backbone`` (profile-specific, see :func:`experiments`)
========  =====================================================================

**The rule** (:data:`RULE`): a variant is adopted only if its verdict on val Recall@5 (the
model-selection metric) against its own experiment's baseline is ``better`` under Holm's
correction over the study's Recall@5 tests; among several ``better`` variants the one with the
largest mean difference; otherwise the baseline is kept. Within a stage the experiments change
disjoint fields, so their winners combine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from helpers.core.config import Config, check
from helpers.core.errors import InputError

STAGES = ("02_1", "02_2", "03")
KS = (1, 5, 10)
PRIMARY_K = 5  # Recall@5, the model-selection metric of train.fit, so the study decides on it too
PRIMARY = f"recall@{PRIMARY_K}"
RULE = (
    "adopt a variant only if its verdict on val Recall@5 against the experiment's own baseline is `better` "
    "(Holm-corrected over the study's Recall@5 tests: Holm-adjusted p below 0.05 and the whole interval at "
    "Holm's level above 0); among several `better` variants the one with the largest mean difference; "
    "otherwise keep the baseline"
)
# The training budget of the profile's recipe, recorded in final_config.json beside the decisions.
RECIPE_FIELDS = ("img_size", "epochs", "patience", "p_items", "k_images", "optimizer", "lr", "schedule")
# Stated per-epoch estimates (train + val pass, seconds) for the projected-time print, used
# until runs of the study have been measured: fixture from 5–17 s per 1-epoch run measured on
# the shared 2-core machine (most of it evaluation); demo from the first epochs of a demo fit on
# an idle 2-core AMD EPYC (27–28 s of training) plus its stop items' val pass (about 1,480 images:
# their consumer photos and the 1,119 val shop photos, at the 70 images/s measured with the 900
# val items' tree); full a guess for EfficientNet-B3 on a Colab T4 with the 10 % TOPS+DRESSES
# sample.
SECONDS_PER_EPOCH = {"fixture": 10.0, "demo": 49.0, "full": 60.0}

# Post-processing (no training): each method alone against `none` on the final configuration's runs.
POSTPROCESS = "postprocess"
POSTPROCESS_QUESTION = "Does post-processing the final configuration's rankings (no training) help?"
POSTPROCESS_RULE = (
    "adopt a method only if its verdict on val Recall@5 against `none` is `better` (Holm-corrected over this "
    "experiment's Recall@5 tests: Holm-adjusted p below 0.05 and the whole interval at Holm's level above 0); "
    "among several `better` methods the one with the largest mean difference; otherwise keep `none`"
)


@dataclass(frozen=True)
class Experiment:
    """A named comparison: ``variants`` maps a variant's name to its config overrides on the
    stage baseline (the baseline itself is the variant ``"baseline"``, no overrides).

    A variant named in ``exploratory`` is measured with the study's statistics but stays out of
    Holm's family and cannot be adopted: its interval is uncorrected and says so, and it runs
    on :data:`helpers.core.config.EXPLORATORY_SEEDS` seeds. The others are primary."""

    name: str
    stage: str
    question: str
    variants: dict
    exploratory: tuple[str, ...] = ()

    @property
    def fields(self) -> set[str]:
        return {name for overrides in self.variants.values() for name in overrides}

    @property
    def primary(self) -> list[str]:
        return [v for v in self.variants if v not in self.exploratory]


def _levels(field: str, values) -> dict:
    """``{"field=value": {field: value}}`` for each value (the one equal to the baseline's
    value is dropped later, by :func:`resolve_variants`)."""
    return {f"{field}={value}": {field: value} for value in values}


# Per profile and experiment: (primary levels, exploratory levels) of the field it varies.
# demo (the 2-core CPU) asks every question of the original study with 8 primary tests, the
# family whose strictest Holm level 5 seeds × 800 compared val items pass with a minimum detectable
# Recall@5 difference under 0.05 (results/demo/power_plan.csv); each question's primary variant is the
# one the original study claimed or a user would adopt; the rest are exploratory, and a question
# asks one level where the original study asked one (photometric: gray-world, the correction it
# credited; batch composition: more items per batch). full (a GPU)
# runs the whole ladder as primary tests. fixture (CI) runs every code path within seconds; its
# levels include the baseline's value, which is dropped, so its planned family is larger than
# the family that runs (a path the statistics must handle).
LEVELS = {
    "resize": {"fixture": (("squash",), ()), "demo": (("squash",), ()), "full": (("squash",), ())},
    "img_size": {"fixture": ((48,), (64,)), "demo": ((192,), (128,)), "full": ((224, None), ())},
    "augment": {
        "fixture": (("weak",), ("strong",)),
        "demo": (("medium",), ("strong", "super_strong")),
        "full": (("weak", "medium", "strong", "super_strong"), ()),
    },
    "box_margin": {"fixture": ((0.0,), (0.1,)), "demo": ((0.1,), ()), "full": ((0.1, 0.2), ())},
    "photometric": {
        "fixture": (("none",), ("grayworld",)),
        "demo": (("grayworld",), ()),
        "full": (("clahe", "grayworld", "both"), ()),
    },
    "head": {"fixture": (("bnneck",), ()), "demo": ((), ("bnneck",)), "full": (("bnneck",), ())},
    "loss": {
        "fixture": (("batch_hard",), ("infonce",)),
        "demo": (("semi_hard",), ("infonce",)),
        "full": (("semi_hard", "infonce"), ()),
    },
    "embed_dim": {"fixture": ((32,), (64,)), "demo": ((), (128, 512)), "full": ((128, 512), ())},
}


def _question(field: str, profile: str) -> tuple[dict, tuple[str, ...]]:
    """``(variants, exploratory names)`` of the experiment that varies ``field`` under ``profile``."""
    primary, exploratory = LEVELS[field][profile]
    variants = _levels(field, (*primary, *exploratory))
    return variants, tuple(_levels(field, exploratory))


def _recipe_experiments(profile: str) -> list[Experiment]:
    """The recipe's own questions (demo and fixture): batch composition at a fixed number of
    images per epoch, training length, and train data size. Length and data size are
    exploratory: a shorter run or less data is never adopted, they measure what the recipe gets
    from each. The demo's epochs hold 576 images (18 batches of 32); the fixture's 16."""
    if profile == "full":
        return []
    images = {"fixture": 16, "demo": 576}[profile]
    batch = {"fixture": {"P×K=2×4": (2, 4)}, "demo": {"P×K=16×2": (16, 2)}}[profile]
    length = {"fixture": 2, "demo": 10}[profile]
    return [
        Experiment(
            "batch",
            "03",
            "Which batch composition: more items with fewer images each, or fewer items with more, at the same "
            "batch size and images per epoch?",
            {name: {"p_items": p, "k_images": k, "epoch_images": images} for name, (p, k) in batch.items()},
        ),
        Experiment(
            "length",
            "03",
            "How much does the recipe's full length add over the shorter one used before (the rate decaying over "
            "those fewer epochs)?",
            {f"epochs={length}": {"epochs": length}},
            exploratory=(f"epochs={length}",),
        ),
        Experiment(
            "data_size",
            "03",
            "How much does the recipe gain from more train items (a quarter, a half, all)?",
            _levels("train_fraction", (0.25, 0.5) if profile == "demo" else (0.5,)),
            exploratory=tuple(_levels("train_fraction", (0.25, 0.5) if profile == "demo" else (0.5,))),
        ),
    ]


def experiments(profile: str) -> list[Experiment]:
    """Every experiment of the study, in the order they run, for ``profile``.

    Resolution and backbone depend on the profile: under ``demo`` the offline-pretrained
    EfficientNet-Lite0 vs Lite1 (packaged ImageNet weights; no hub), under ``full`` ResNet-34,
    EfficientNet-B3 at their native resolution and the DINOv2 ViT-S/14 foundation model (hub
    weights), under ``fixture`` two tiny random-init timm test networks.
    """
    backbone = {
        "fixture": {"backbone=test_resnet": {"backbone": "test_resnet"}},
        "demo": {"backbone=tf_efficientnet_lite1": {"backbone": "tf_efficientnet_lite1", "weights": "packaged"}},
        # img_size None: each CNN at its own pretrained (native) input size. DINOv2 ViT-S/14 at 224
        # (16 × 16 patches), the resolution of most of its pretraining (518 only in its last phase:
        # 5.4× the tokens, for photos whose long side is 300 px), on its class token; cost in
        # docs/scaling.md.
        "full": {
            "backbone=resnet34": {"backbone": "resnet34", "weights": "hub", "img_size": None},
            "backbone=efficientnet_b3": {"backbone": "efficientnet_b3", "weights": "hub", "img_size": None},
            "backbone=vit_small_patch14_dinov2": {
                "backbone": "vit_small_patch14_dinov2.lvd142m",
                "weights": "hub",
                "img_size": 224,
                "pooling": "cls",
            },
        },
    }[profile]
    crop_exploratory = ("crop=False",) if profile == "demo" else ()

    def asked(name: str, stage: str, question: str, field: str) -> Experiment:
        variants, exploratory = _question(field, profile)
        return Experiment(name, stage, question, variants, exploratory)

    return [
        Experiment(
            "crop",
            "02_1",
            "Does cropping to the garment box beat the whole photo?",
            {"crop=False": {"crop": False}},
            exploratory=crop_exploratory,
        ),
        asked("resize", "02_1", "Does letterbox (aspect kept) beat the original study's squash resize?", "resize"),
        asked("resolution", "02_1", "Which input side?", "img_size"),
        asked("augment", "02_2", "Which augmentation preset?", "augment"),
        asked("margin", "02_2", "Does growing the box (the consumer/shop 'box gap') help?", "box_margin"),
        asked("photometric", "02_2", "Does photometric 'domain normalisation' help?", "photometric"),
        asked(
            "head",
            "02_2",
            "BatchNorm in the head (bn, the original study's) or BNNeck? (L2 is always on: cosine retrieval needs it)",
            "head",
        ),
        asked("loss", "03", "Which metric loss?", "loss"),
        asked("embed_dim", "03", "Which embedding dimension?", "embed_dim"),
        Experiment("backbone", "03", "Which backbone?", backbone),
        *_recipe_experiments(profile),
    ]


def get_experiment(profile: str, name: str) -> Experiment:
    found = {e.name: e for e in experiments(profile)}
    if name not in found:
        raise InputError(
            f"unknown experiment {name!r}; choose one of: {', '.join(found)}, a stage ({', '.join(STAGES)}) or all"
        )
    return found[name]


def select(profile: str, name: str) -> list[Experiment]:
    """The experiments an argument names: one experiment, a stage, or ``all``."""
    if name == "all":
        return experiments(profile)
    if name in STAGES:
        return [e for e in experiments(profile) if e.stage == name]
    return [get_experiment(profile, name)]


def resolve_variants(experiment: Experiment, base: Config) -> dict[str, Config]:
    """``{"baseline": base, variant: config}``; a variant identical to the baseline (e.g.
    ``augment=medium`` when the baseline already uses it) is the baseline and is dropped."""
    out = {"baseline": base}
    for name, overrides in experiment.variants.items():
        cfg = check(replace(base, **overrides))
        if all(getattr(base, k) == v for k, v in overrides.items()):
            continue
        out[name] = cfg
    return out


def changed_fields(configs: dict[str, Config]) -> list[str]:
    """Config fields (seed aside) on which any variant differs from the baseline."""
    base = asdict(configs["baseline"])
    return sorted({k for cfg in configs.values() for k, v in asdict(cfg).items() if k != "seed" and base[k] != v})


def decided_fields(profile: str) -> list[str]:
    """The config fields the study decides (those its experiments vary)."""
    return sorted({f for e in experiments(profile) for f in e.fields})


def planned_tests(profile: str) -> dict[str, int]:
    """Primary Recall@5 tests each experiment plans, in running order: one per listed primary
    variant (an upper bound: a variant equal to its stage baseline is dropped when it runs)."""
    return {e.name: len(e.primary) for e in experiments(profile)}


def earlier(profile: str, stage: str) -> list[Experiment]:
    """The experiments of every stage before ``stage``, in running order."""
    return [e for e in experiments(profile) if STAGES.index(e.stage) < STAGES.index(stage)]
