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
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = Path(os.environ.get("C2S_OUTPUTS", REPO_ROOT / "outputs"))


@dataclass(frozen=True)
class Config:
    profile: str
    # data
    data_root: str | None = None          # None: the profile's synthetic tree under outputs/
    synthetic_items: int = 300            # size of the generated tree when data_root is None
    synthetic_seed: int = 0
    categories: tuple[str, ...] | None = ("TOPS", "DRESSES")
    sample: tuple[float, float, float] | None = (0.1, 0.02, 0.02)
    resplit: tuple[float, float, float] | None = None
    split_seed: int = 42
    # preprocessing
    img_size: int | None = None           # None: the backbone's pretrained input size
    resize: str = "letterbox"             # letterbox | squash (the seed's)
    box_margin: float = 0.0
    augment: str = "medium"
    photometric: str = "none"
    # model
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "auto"
    embed_dim: int = 256
    head: str = "bn"
    pooling: str = "avg"
    # training
    loss: str = "batch_hard"
    margin: float = 0.2
    temperature: float = 0.07
    p_items: int = 16
    k_images: int = 4
    epochs: int = 10
    lr: float = 1e-3                      # head; the backbone gets lr × backbone_lr_mult
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    grad_clip: float = 5.0
    patience: int = 5
    amp: str = "auto"                     # auto (bf16 on a GPU that has it, else fp16) | off
    seed: int = 0
    deterministic: bool = True
    num_workers: int = 2
    device: str = "auto"
    flip_tta: bool = False

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
        profile="fixture", synthetic_items=24, categories=None, sample=None,
        img_size=64, augment="weak", backbone="test_efficientnet", weights="none", embed_dim=32,
        p_items=4, k_images=2, epochs=1, warmup_epochs=0, num_workers=0, patience=1,
    ),
    "demo": Config(
        profile="demo", synthetic_items=300, categories=None, sample=None,
        img_size=128, backbone="tf_efficientnet_lite0", weights="packaged", embed_dim=128,
        p_items=8, k_images=4, epochs=15, num_workers=2,
    ),
    "full": Config(
        profile="full", img_size=None, backbone="efficientnet_b3", weights="hub", embed_dim=256,
        p_items=16, k_images=4, epochs=40, num_workers=4, deterministic=False,
    ),
}


def get_config(profile: str = "demo", **overrides) -> Config:
    """The profile's config with the non-None overrides applied; unknown names are errors."""
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
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
    for name in ("warmup_epochs", "num_workers", "box_margin", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise InputError(f"{name} must be non-negative, got {getattr(cfg, name)}")
    if cfg.k_images < 2:
        raise InputError(f"k_images must be at least 2 (one consumer and one shop image), got {cfg.k_images}")
    if cfg.amp not in ("auto", "off"):
        raise InputError(f"amp must be auto or off, got {cfg.amp!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise InputError(f"device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise InputError(f"lr must be a positive number, got {cfg.lr}")
    return cfg
