"""Profiles: one code path, three sizes (see DESIGN.md).

* ``fixture``: a tiny synthetic tree, a tiny random-init timm model: CI, seconds.
* ``demo`` (the offline default): a few hundred synthetic items, packaged EfficientNet-Lite0
  ImageNet weights: a laptop CPU, minutes.
* ``full``: a real DeepFashion C2S download (``C2S_DATA_ROOT``), hub weights: Colab / GPU.

``get_config(profile, **overrides)`` returns a frozen :class:`Config`; overrides whose value
is None are ignored, so CLI flags and notebook parameters can be passed through untouched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import InputError, choose

OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "constant")
REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = Path(os.environ.get("C2S_OUTPUTS", REPO_ROOT / "outputs"))


# Fields that change how a run is executed, never its results (batches, augmentation and
# losses are the same for any worker count): a resume may change them.
RUNTIME_FIELDS = ("num_workers", "embed_batch", "device")


def _opt(default, help: str):
    """A config field with its one-line help (shown by the CLI)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    profile: str = field(metadata={"help": "fixture | demo | full (see the module docstring)"})
    # data
    data_root: str | None = _opt(None, "the DeepFashion C2S root; None: the profile's synthetic tree under outputs/")
    synthetic_items: int = _opt(300, "items in the generated synthetic tree (when data_root is None)")
    synthetic_seed: int = _opt(0, "seed of the generated synthetic tree")
    categories: tuple[str, ...] | None = _opt(("TOPS", "DRESSES"), "categories kept by prepare; None: all")
    sample: tuple[float, float, float] | None = _opt((0.1, 0.02, 0.02), "item fractions of train/val/test kept")
    resplit: tuple[float, float, float] | None = _opt(None, "item-level re-split ratios instead of the partition")
    split_seed: int = _opt(42, "seed of the item sampling")
    # preprocessing
    img_size: int | None = _opt(None, "input side in px; None: the backbone's pretrained input size")
    resize: str = _opt("letterbox", "letterbox keeps the aspect ratio; squash is the seed's")
    box_margin: float = _opt(0.0, "grow the box by this fraction of its size on each side")
    crop: bool = _opt(True, "crop each image to its garment box (+ box_margin); False: the whole photo")
    augment: str = _opt("medium", "augmentation preset of the training images")
    photometric: str = _opt("none", "photometric 'domain normalisation' of every image")
    # model
    backbone: str = _opt("tf_efficientnet_lite0", "any timm model name")
    weights: str = _opt("auto", "where the backbone's pretrained weights come from")
    embed_dim: int = _opt(256, "embedding dimension")
    head: str = _opt("bn", "embedding head: bn = Linear-BN-L2 (the seed's), bnneck = Linear-BN, L2 for retrieval")
    pooling: str = _opt("avg", "global pooling of the backbone's feature map")
    # training
    loss: str = _opt("batch_hard", "metric loss")
    margin: float = _opt(0.2, "triplet margin (semi_hard, batch_hard)")
    temperature: float = _opt(0.07, "InfoNCE temperature")
    xbm_size: int = _opt(0, "cross-batch memory (XBM) of this many recent embeddings mined with the batch; 0: off")
    xbm_start_epoch: int = _opt(1, "first epoch (0-based) that uses the cross-batch memory")
    p_items: int = _opt(16, "P: items per batch")
    k_images: int = _opt(4, "K: images per item (>= 1 consumer + 1 shop)")
    epochs: int = _opt(10, "maximum epochs")
    optimizer: str = _opt("adamw", "adamw | adam")
    lr: float = _opt(1e-3, "learning rate of the head; the backbone gets lr x backbone_lr_mult")
    backbone_lr_mult: float = _opt(0.1, "backbone learning rate as a fraction of lr")
    weight_decay: float = _opt(1e-4, "weight decay")
    schedule: str = _opt("cosine", "cosine (after warm-up) | constant")
    warmup_epochs: int = _opt(1, "linear warm-up epochs")
    grad_clip: float = _opt(5.0, "gradient norm clip")
    patience: int = _opt(5, "early stop after this many epochs without a better val recall@5")
    amp: str = _opt("auto", "auto: bf16 on a GPU that has it, else fp16; off: fp32 (always fp32 on CPU)")
    seed: int = _opt(0, "seed of initialisation, batches and augmentation")
    deterministic: bool = _opt(True, "deterministic kernels (same-seed reruns identical)")
    num_workers: int | None = _opt(None, "DataLoader workers; None: 0 on <= 2 cores, else cores - 1 (max 8)")
    embed_batch: int | None = _opt(None, "embedding batch size; None: 16 on CPU (measured fastest), 256 on GPU")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N | mps")
    flip_tta: bool = _opt(False, "average each embedding with its horizontally flipped image's")
    compile: bool = _opt(False, "torch.compile the model for training (GPU: faster steps after a slow first one)")

    @property
    def work_dir(self) -> Path:
        """Where this profile's generated data and prepared tables live (git-ignored)."""
        return OUTPUTS / self.profile

    @property
    def prepared_dir(self) -> Path:
        return self.work_dir / "prepared"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    # write (benchmarks/recipes.py, README "Default recipe"): the plain reference (letterbox
    # 160 px, flip only, batch-hard 0.2, Adam 1e-3 head / 1e-4 backbone at a constant rate,
    # Linear-BN-L2 256-d, 8 epochs) with P×K 8×4, twice its updates for the same images.
    "demo": Config(
        profile="demo",
        synthetic_items=300,
        categories=None,
        sample=None,
        img_size=160,
        augment="flip",
        backbone="tf_efficientnet_lite0",
        weights="packaged",
        embed_dim=256,
        p_items=8,
        k_images=4,
        optimizer="adam",
        weight_decay=0.0,
        schedule="constant",
        warmup_epochs=0,
        epochs=8,
        patience=8,
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


def config_from_dict(values: dict) -> Config:
    """Inverse of ``asdict`` after a JSON round trip (lists back to the tuples a Config holds);
    fields added since the dict was written take their defaults."""
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def get_config(profile: str = "demo", **overrides) -> Config:
    """The profile's config with the non-None overrides applied; unknown names are errors."""
    choose(profile, tuple(PROFILES), "profile")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"unknown config fields: {', '.join(unknown)}")
    values = {k: v for k, v in overrides.items() if v is not None}
    if profile == "full" and not (values.get("data_root") or os.environ.get("C2S_DATA_ROOT")):
        raise InputError("profile 'full' needs the DeepFashion C2S root: set C2S_DATA_ROOT or pass data_root")
    if profile == "full":
        values.setdefault("data_root", os.environ["C2S_DATA_ROOT"] if "C2S_DATA_ROOT" in os.environ else None)
    return check(replace(PROFILES[profile], **values))


def check(cfg: Config) -> Config:
    """Reject values no run can use, with the field's name (before any work starts)."""
    for name in ("epochs", "patience", "p_items", "embed_dim", "synthetic_items"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in (
        "warmup_epochs",
        "num_workers",
        "box_margin",
        "weight_decay",
        "grad_clip",
        "xbm_size",
        "xbm_start_epoch",
        "embed_batch",
    ):
        if (getattr(cfg, name) or 0) < 0:
            raise InputError(f"{name} must be non-negative, got {getattr(cfg, name)}")
    if cfg.k_images < 2:
        raise InputError(f"k_images must be at least 2 (one consumer and one shop image), got {cfg.k_images}")
    choose(cfg.amp, ("auto", "off"), "amp")
    choose(cfg.optimizer, OPTIMIZERS, "optimizer")
    choose(cfg.schedule, SCHEDULES, "schedule")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise InputError(f"device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise InputError(f"lr must be a positive number, got {cfg.lr}")
    return cfg
