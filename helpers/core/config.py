"""Profiles: one code path, three sizes.

* ``fixture``: a tiny synthetic tree, a tiny random-init timm model: CI, seconds.
* ``demo`` (the offline default): a few hundred synthetic items, packaged EfficientNet-Lite0
  ImageNet weights: a laptop CPU, minutes.
* ``full``: a real DeepFashion C2S download (``C2S_DATA_ROOT``), hub weights: Colab / GPU.

``get_config(profile, **overrides)`` returns a frozen :class:`Config`; overrides whose value
is None are ignored, so CLI flags and notebook parameters can be passed through untouched.
Every Config that :func:`get_config` or :func:`config_from_dict` returns has passed :func:`check`:
each field's type, range or choice, so a bad value fails before any work, naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from helpers.core.errors import InputError, choose
from helpers.core.files import REPO_ROOT

OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("auto", "off")
# The names of registries that live in the layers above (helpers.data.transforms,
# helpers.modeling.models / losses) and import torch: check() and the CLI's --help must not
# import them, so the names are repeated here; tests/test_config.py checks that they agree.
RESIZE_MODES = ("letterbox", "squash")  # transforms.RESIZE_MODES
AUGMENT_PRESETS = ("none", "flip", "weak", "medium", "strong", "super_strong")  # transforms.AUGMENT_PRESETS
PHOTOMETRIC_MODES = ("none", "clahe", "grayworld", "both")  # transforms.PHOTOMETRIC_MODES
WEIGHT_SOURCES = ("auto", "hub", "packaged", "none")  # models.WEIGHT_SOURCES
HEADS = ("bn", "bnneck", "pooled")  # models.HEADS
POOLINGS = ("avg", "gem", "cls")  # models.POOLINGS
LOSSES = ("semi_hard", "batch_hard", "infonce")  # losses.LOSSES
# The fields whose value is one of a fixed set of names.
CHOICES: dict[str, tuple[str, ...]] = {
    "resize": RESIZE_MODES,
    "augment": AUGMENT_PRESETS,
    "photometric": PHOTOMETRIC_MODES,
    "weights": WEIGHT_SOURCES,
    "head": HEADS,
    "pooling": POOLINGS,
    "loss": LOSSES,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "amp": AMP_MODES,
}
OUTPUTS = Path(os.environ.get("C2S_OUTPUTS", REPO_ROOT / "outputs"))


# Fields that say which data a run reads: where it lives and what `prepare` keeps of it. A run
# handed a prepared table (the CLI's train and evaluate) takes its images from the table.
DATA_FIELDS = (
    "data_root",
    "synthetic_items",
    "synthetic_splits",
    "synthetic_seed",
    "categories",
    "sample",
    "resplit",
    "split_seed",
)
# Fields that change how a run is executed, never its results (batches, augmentation and
# losses are the same for any worker count): a resume may change them.
RUNTIME_FIELDS = ("num_workers", "embed_batch", "device")
# Fields an evaluation of a trained model may set: how it runs, and test-time flipping.
EVALUATION_FIELDS = (*RUNTIME_FIELDS, "flip_tta")
# How an image becomes the model's input, besides its side (a checkpoint records all of them; a
# zero-shot evaluation takes the side from the backbone).
PREPROCESSING_FIELDS = ("resize", "box_margin", "crop", "photometric")


def _opt(default, help: str):
    """A config field with its one-line help (shown by the CLI)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    profile: str = field(metadata={"help": "fixture | demo | full (see the module docstring)"})
    # data
    data_root: str | None = _opt(None, "the DeepFashion C2S root; None: the profile's synthetic tree under outputs/")
    synthetic_items: int = _opt(300, "items in the generated synthetic tree (when data_root is None)")
    synthetic_splits: tuple[int, int, int] | None = _opt(
        None, "items of the generated tree per split (train, val, test), summing to synthetic_items; None: 50/25/25 %"
    )
    synthetic_seed: int = _opt(0, "seed of the generated synthetic tree")
    categories: tuple[str, ...] | None = _opt(("TOPS", "DRESSES"), "categories kept by prepare; None: all")
    sample: tuple[float, float, float] | None = _opt((0.1, 0.02, 0.02), "item fractions of train/val/test kept")
    resplit: tuple[float, float, float] | None = _opt(None, "item-level re-split ratios instead of the partition")
    split_seed: int = _opt(42, "seed of the item sampling")
    train_fraction: float = _opt(1.0, "fraction of the train items a run trains on (nested subsets, by split_seed)")
    stop_items: int = _opt(
        0, "val items that early stopping and best.pt's choice use, left out of the val the study compares; 0: all val"
    )
    # preprocessing
    img_size: int | None = _opt(None, "input side in px; None: the backbone's pretrained input size")
    resize: str = _opt("letterbox", "letterbox keeps the aspect ratio; squash (the original study's) stretches")
    box_margin: float = _opt(0.0, "grow the box by this fraction of its size on each side")
    crop: bool = _opt(True, "crop each image to its garment box (+ box_margin); False: the whole photo")
    augment: str = _opt("medium", "augmentation preset of the training images")
    photometric: str = _opt("none", "photometric 'domain normalisation' of every image")
    # model
    backbone: str = _opt("tf_efficientnet_lite0", "any timm model name")
    weights: str = _opt("auto", "where the backbone's pretrained weights come from")
    embed_dim: int = _opt(256, "embedding dimension")
    head: str = _opt(
        "bn", "embedding head: bn = Linear-BN-L2 (the original study's), bnneck = Linear-BN, L2 for retrieval"
    )
    pooling: str = _opt("avg", "global pooling: avg (CNN map or ViT patch tokens), gem (CNN), cls (ViT class token)")
    # training
    loss: str = _opt("batch_hard", "metric loss")
    margin: float = _opt(0.2, "triplet margin (semi_hard, batch_hard)")
    temperature: float = _opt(0.07, "InfoNCE temperature")
    xbm_size: int = _opt(0, "cross-batch memory (XBM) of this many recent embeddings mined with the batch; 0: off")
    xbm_start_epoch: int = _opt(1, "first epoch (0-based) that uses the cross-batch memory")
    p_items: int = _opt(16, "P: items per batch")
    k_images: int = _opt(4, "K: images per item (>= 1 consumer + 1 shop)")
    epochs: int = _opt(10, "maximum epochs")
    epoch_images: int | None = _opt(None, "training images per epoch (P×K batches); None: each train item once")
    optimizer: str = _opt("adamw", "adamw | adam")
    lr: float = _opt(1e-3, "learning rate of the head; the backbone gets lr x backbone_lr_mult")
    backbone_lr_mult: float = _opt(0.1, "backbone learning rate as a fraction of lr")
    layer_decay: float = _opt(1.0, "layer-wise lr decay: each backbone layer gets this x the one above; 1.0: off")
    weight_decay: float = _opt(1e-4, "weight decay")
    schedule: str = _opt("cosine", "cosine (after warm-up) | constant")
    warmup_epochs: int = _opt(1, "linear warm-up epochs")
    grad_clip: float = _opt(5.0, "gradient norm clip")
    patience: int = _opt(5, "early stop after this many epochs without a better val recall@5 (ties: a better mAP)")
    amp: str = _opt("auto", "auto: bf16 on a GPU that has it, else fp16; off: fp32 (always fp32 on CPU)")
    seed: int = _opt(0, "seed of initialisation, batches and augmentation")
    deterministic: bool = _opt(True, "deterministic kernels (same-seed reruns identical)")
    num_workers: int | None = _opt(None, "DataLoader workers; None: 0 on <= 2 cores, else cores - 1 (max 8)")
    embed_batch: int | None = _opt(None, "embedding batch size; None: 16 on CPU (measured fastest), 256 on GPU")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N | mps")
    flip_tta: bool = _opt(False, "average each embedding with its horizontally flipped image's")
    compile: bool = _opt(False, "torch.compile the model for training (GPU: faster steps after a slow first one)")
    grad_checkpointing: bool = _opt(False, "recompute backbone activations in backward: less memory, slower steps")

    @property
    def work_dir(self) -> Path:
        """Where this profile's generated data and prepared tables live (git-ignored):
        ``outputs/<profile>``, or ``outputs/<profile>_<N>items`` for a synthetic tree of another
        size than the profile's own (``make demo``'s), so that two trees never share a folder."""
        own = PROFILES.get(self.profile)
        tree = (self.synthetic_items, self.synthetic_splits)
        if self.data_root is None and own is not None and tree != (own.synthetic_items, own.synthetic_splits):
            return OUTPUTS / f"{self.profile}_{self.synthetic_items}items"
        return OUTPUTS / self.profile

    @property
    def prepared_dir(self) -> Path:
        return self.work_dir / "prepared"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Seeds per configuration of `python -m helpers study`, per profile: the primary variants and
# baselines get STUDY_SEEDS (demo: 5, what a 0.05 minimum detectable effect at Holm's level needs,
# results/demo/power_plan.csv), the exploratory variants EXPLORATORY_SEEDS (never more). fixture:
# one seed keeps each notebook's grid of tiny runs within seconds in CI; the multi-seed paths
# (std, pairing by seed) are covered by tests/test_study.py.
STUDY_SEEDS = {"fixture": 1, "demo": 5, "full": 3}
EXPLORATORY_SEEDS = {"fixture": 1, "demo": 3, "full": 3}
# A primary test that its own variance components left short of the planned power at its decision
# runs more seeds, both arms, by a rule written before its extra runs (the study's README in
# results/): batch composition's minimum detectable Recall@5 difference at Holm's strictest level
# was 0.067 with 5 seeds, 8 seeds were planned to bring it to 0.041. Only at the profile's own STUDY_SEEDS; the
# final model keeps STUDY_SEEDS.
RESIZED_SEEDS = {"fixture": {}, "demo": {"batch": 8}, "full": {}}

# `make demo` (`python -m helpers demo`) trains this many epochs of the profile's recipe, so the
# whole demo stays within 6 minutes on a 2-core CPU; the study's runs train until val Recall@5
# levels off (docs/benchmarks.md gives the demo's measured time).
DEMO_EPOCHS = {"fixture": 1, "demo": 5}
# ... on a synthetic tree of its own (in outputs/demo_450items/, see Config.work_dir): on the
# study's tree, whose 900 val items are sized for its power, the demo took 484 s, on this one
# 260 s (docs/benchmarks.md). As many train items as the study's (150); 150 val items, 50 of
# which choose the epoch; 150 test items.
DEMO_TREE = {"demo": {"synthetic_items": 450, "synthetic_splits": (150, 150, 150), "stop_items": 50}}

PROFILES: dict[str, Config] = {
    "fixture": Config(
        profile="fixture",
        synthetic_items=24,
        categories=None,
        sample=None,
        img_size=64,
        augment="weak",
        backbone="test_efficientnet",
        weights="none",
        embed_dim=32,
        p_items=4,
        k_images=2,
        epochs=1,
        warmup_epochs=0,
        num_workers=0,
        patience=1,
    ),
    # The default recipe, chosen on val on a DeepFashion-format tree this repository did not
    # write (benchmarks/recipes.py, docs/recipe.md): the plain reference (letterbox
    # 160 px, flip only, batch-hard 0.2, Adam 1e-3 head / 1e-4 backbone, Linear-BN-L2 256-d)
    # with P×K 8×4, twice its updates for the same images. Length: the rate decays on a cosine
    # over 30 epochs, and a run stops once val Recall@5 has not risen for 10 epochs (a third of the
    # schedule): on a baseline run at this rate the stop items' Recall@5 went two epochs without a
    # rise twice while the compared items' still rose, up to epoch 26 of 30
    # (results/demo/set_aside/cosine_curve/); under a patience of 5 the first runs of this design
    # stopped as early as epoch 13 and compared below the runs of their configuration that reached
    # the cap, whose rise late in the decay (about half a point an epoch) is smaller than the stop
    # items' epoch-to-epoch noise; a run that reaches the cap pays nothing for the longer patience
    # (runs.stop_gap compares the runs it stops with those that reach the cap). At a constant
    # rate the runs rose about a point an epoch with larger swings until 3 epochs of swing
    # stopped them (the 5 baseline seeds' best epochs: 16 to 22), so a run's luck in when it
    # stopped set a seed spread (SD 0.034 val Recall@5) no power plan survives; the decay lets
    # every run settle. The tree: 150 train items (as before), 900 val items, of which 100 choose each
    # run's epoch (stop_items) and 800 compare runs, and 150 test items. 800, not the 400 of the
    # first plan: an interim look at the first two experiments' variance components (item part
    # seven times the planned one; results/demo/set_aside/interim_400/) put the primary tests'
    # minimum detectable effect at 0.057 with 400, 0.041 with 800 (results/demo/power_plan.csv).
    "demo": Config(
        profile="demo",
        synthetic_items=1200,
        synthetic_splits=(150, 900, 150),
        stop_items=100,
        categories=None,
        sample=None,
        img_size=160,
        augment="flip",
        backbone="tf_efficientnet_lite0",
        weights="packaged",
        embed_dim=256,
        p_items=8,
        k_images=4,
        # 18 P×K batches an epoch: one pass over the 150 train items (150 // 8), fixed so that the
        # batch-composition and data-size variants train on as many images per epoch.
        epoch_images=576,
        optimizer="adam",
        weight_decay=0.0,
        schedule="cosine",
        warmup_epochs=0,
        epochs=30,
        patience=10,
    ),
    "full": Config(
        profile="full",
        img_size=None,
        backbone="efficientnet_b3",
        weights="hub",
        embed_dim=256,
        p_items=16,
        k_images=4,
        epochs=40,
        deterministic=False,
    ),
}


# --------------------------------------------------------------------------- checks

# (field name, value) -> None when the value is usable, else the one-line reason naming the field.
Check = Callable[[str, object], "str | None"]


def _integer(low: int, *, optional: bool = False, why: str = "") -> Check:
    """An int (a bool is not one) of at least ``low``; also None when ``optional``."""

    def problem(name: str, value) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be an integer{' or None' if optional else ''}, got {value!r}"
        return f"{name} must be at least {low}{why}, got {value}" if value < low else None

    return problem


def _number(*, positive: bool) -> Check:
    """A finite real number (a bool is not one), > 0 when ``positive``, else >= 0."""

    def problem(name: str, value) -> str | None:
        kind = "positive" if positive else "non-negative"
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return f"{name} must be a {kind} number, got {value!r}"
        return f"{name} must be a {kind} number, got {value}" if value < 0 or (positive and value == 0) else None

    return problem


def _fraction(name: str, value) -> str | None:
    """A finite real number in (0, 1] (a bool is not one)."""
    usable = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    return None if usable and 0 < value <= 1 else f"{name} must be a number in (0, 1], got {value!r}"


def _flag(name: str, value) -> str | None:
    return None if isinstance(value, bool) else f"{name} must be True or False, got {value!r}"


def _one_of(choices: tuple[str, ...]) -> Check:
    def problem(name: str, value) -> str | None:
        return None if value in choices else f"unknown {name} {value!r}; choose one of: {', '.join(choices)}"

    return problem


def _text(*, optional: bool = False, pattern: str | None = None, expected: str = "a non-empty string") -> Check:
    def problem(name: str, value) -> str | None:
        if value is None and optional:
            return None
        usable = isinstance(value, str) and value != "" and (pattern is None or re.fullmatch(pattern, value))
        return None if usable else f"{name} must be {expected}{' or None' if optional else ''}, got {value!r}"

    return problem


def _names(name: str, value) -> str | None:
    if value is None or (isinstance(value, tuple) and value and all(isinstance(v, str) and v.strip() for v in value)):
        return None
    return f"{name} must be a tuple of category names or None (all), got {value!r}"


def _fractions(*, at_most_one: bool) -> Check:
    """None, or three finite non-negative numbers (train, val, test), not all zero; each <= 1
    when ``at_most_one`` (the share of a split's items kept)."""

    def problem(name: str, value) -> str | None:
        if value is None:
            return None
        usable = (
            isinstance(value, tuple)
            and len(value) == 3
            and all(not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) for v in value)
            and min(value) >= 0
            and sum(value) > 0
            and (not at_most_one or max(value) <= 1)
        )
        if usable:
            return None
        bound = " in [0, 1]" if at_most_one else " (ratios)"
        return f"{name} must be None or three non-negative numbers{bound} for train, val, test, got {value!r}"

    return problem


def _split_items(name: str, value) -> str | None:
    """None or (train, val, test) item counts: train >= 2 (a P×K batch needs two items), val and test >= 1."""
    if value is None:
        return None
    ints = isinstance(value, tuple) and len(value) == 3
    ints = ints and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if ints and value[0] >= 2 and min(value[1:]) >= 1:
        return None
    return f"{name} must be None or three integers (train >= 2, val >= 1, test >= 1), got {value!r}"


# One check per field (tests/test_config.py holds this table to every field of Config).
CHECKS: dict[str, Check] = {
    "profile": _one_of(tuple(PROFILES)),
    **{name: _one_of(choices) for name, choices in CHOICES.items()},
    "data_root": _text(optional=True),
    "synthetic_items": _integer(1),
    "synthetic_splits": _split_items,
    "synthetic_seed": _integer(0),
    "categories": _names,
    "sample": _fractions(at_most_one=True),
    "resplit": _fractions(at_most_one=False),
    "split_seed": _integer(0),
    "train_fraction": _fraction,
    "stop_items": _integer(0),
    "epoch_images": _integer(1, optional=True),
    "img_size": _integer(1, optional=True),
    "box_margin": _number(positive=False),
    "crop": _flag,
    "backbone": _text(expected="a timm model name"),
    "embed_dim": _integer(1),
    "margin": _number(positive=False),
    "temperature": _number(positive=True),
    "xbm_size": _integer(0),
    "xbm_start_epoch": _integer(0),
    "p_items": _integer(1),
    "k_images": _integer(2, why=" (one consumer and one shop image)"),
    "epochs": _integer(1),
    "lr": _number(positive=True),
    "backbone_lr_mult": _number(positive=False),
    "layer_decay": _fraction,
    "weight_decay": _number(positive=False),
    "warmup_epochs": _integer(0),
    "grad_clip": _number(positive=True),
    "patience": _integer(1),
    "seed": _integer(0),
    "deterministic": _flag,
    "num_workers": _integer(0, optional=True),
    "embed_batch": _integer(1, optional=True),
    "device": _text(pattern=r"auto|cpu|cuda(:\d+)?|mps", expected="auto, cpu, cuda, cuda:N or mps"),
    "flip_tta": _flag,
    "compile": _flag,
    "grad_checkpointing": _flag,
}


def check(cfg: Config) -> Config:
    """Reject values no run can use, with the field's name (before any work starts)."""
    for f in dataclasses.fields(Config):
        problem = CHECKS[f.name](f.name, getattr(cfg, f.name))
        if problem:
            raise InputError(problem)
    if cfg.synthetic_splits is not None and sum(cfg.synthetic_splits) != cfg.synthetic_items:
        raise InputError(f"synthetic_splits {cfg.synthetic_splits} must sum to synthetic_items ({cfg.synthetic_items})")
    return cfg


def _as_fields(values: dict) -> dict:
    """Field values as a Config holds them: lists (JSON, notebooks) as tuples, a path as text."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown config fields: {', '.join(unknown)}")
    tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if isinstance(tupled.get("data_root"), os.PathLike):
        tupled["data_root"] = os.fspath(tupled["data_root"])
    return tupled


def config_from_dict(values: dict) -> Config:
    """Inverse of ``asdict`` after a JSON round trip (lists back to the tuples a Config holds),
    checked; fields added since the dict was written take their defaults."""
    if "profile" not in values:
        raise InputError("config lacks its profile")
    return check(Config(**_as_fields(values)))


def get_config(profile: str = "demo", **overrides) -> Config:
    """The profile's config with the non-None overrides applied, checked; unknown names are errors."""
    choose(profile, tuple(PROFILES), "profile")
    values = {k: v for k, v in _as_fields(overrides).items() if v is not None}
    if profile == "full":
        values.setdefault("data_root", os.environ.get("C2S_DATA_ROOT"))
        if not values["data_root"]:
            raise InputError("profile 'full' needs the DeepFashion C2S root: set C2S_DATA_ROOT or pass data_root")
    return check(replace(PROFILES[profile], **values))
