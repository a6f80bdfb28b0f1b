"""Preprocessing, one image at a time: decode, box crop, photometric normalisation, resize,
augmentation presets, tensor.

One image goes through ``crop_box`` (box + margin) → ``photometric`` → ``resize_image``
(letterbox by default) → augmentation preset → tensor + Normalize (+ RandomErasing).
:class:`C2STransform` is that chain; :func:`create_transform` builds it for a run from its
config and the model's data config (input size, mean, std, interpolation), the one place where
a run's preprocessing is decided. :mod:`helpers.data.datasets` feeds it table rows.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from helpers.core import errors
from helpers.core.config import Config
from helpers.core.errors import InputError, choose

# ImageNet mean × 255, rounded: the padding colour that normalises to about zero.
IMAGENET_FILL = (124, 116, 104)

RESIZE_MODES = ("letterbox", "squash")
PHOTOMETRIC_MODES = ("none", "clahe", "grayworld", "both")

# timm's interpolation names → PIL resampling filters.
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _resample(interpolation: str) -> Image.Resampling:
    """The PIL filter for a timm interpolation name ("bicubic", "bilinear", ...)."""
    return _PIL_RESAMPLE[choose(interpolation, tuple(_PIL_RESAMPLE), "interpolation")]


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 RGB colour of a normalisation mean, so letterbox padding normalises to ~0."""
    return tuple(int(round(255 * m)) for m in mean)


# --------------------------------------------------------------------------- geometry


def crop_box(image: Image.Image, box: Sequence[float] | None, margin: float = 0.0) -> Image.Image:
    """Crop ``box`` = (x_1, y_1, x_2, y_2), grown by ``margin`` × its width (height) on each side.

    A 100×50 box with margin 0.1 becomes 120×60 (10 px more left and right, 5 px more top and
    bottom), then is clipped to the image. Coordinates are rounded to whole pixels. ``box=None``
    keeps the whole image (a query without a box). An empty box, before or after clipping,
    raises :class:`InputError`.
    """
    if margin < 0:
        raise InputError(f"box margin must be >= 0, got {margin}")
    if box is None:
        return image
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"box {tuple(box)} is empty")
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    width, height = image.size
    left, top = max(0, round(x1 - dx)), max(0, round(y1 - dy))
    right, bottom = min(width, round(x2 + dx)), min(height, round(y2 + dy))
    if right <= left or bottom <= top:
        raise InputError(f"box {tuple(box)} lies outside the {width}x{height} image")
    return image.crop((left, top, right, bottom))


def letterbox(
    image: Image.Image,
    size: int,
    fill: Sequence[int] = IMAGENET_FILL,
    interpolation: str = "bicubic",
) -> Image.Image:
    """Resize the longer side to ``size`` keeping the aspect ratio, centre on a ``size``×``size``
    canvas of colour ``fill``. Garments keep their shape (the original study's squash made a long dress
    and a T-shirt look alike)."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = image.resize(new_size, _resample(interpolation))
    canvas = Image.new("RGB", (size, size), tuple(fill))
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def squash(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Plain resize to ``size``×``size``, distorting the aspect ratio: the original study's behaviour."""
    return image.resize((size, size), _resample(interpolation))


def resize_image(
    image: Image.Image,
    size: int,
    mode: str = "letterbox",
    interpolation: str = "bicubic",
    fill: Sequence[int] = IMAGENET_FILL,
) -> Image.Image:
    """``mode`` "letterbox" (default) or "squash" (to reproduce the original study); others raise."""
    if choose(mode, RESIZE_MODES, "resize mode") == "squash":
        return squash(image, size, interpolation)
    return letterbox(image, size, fill, interpolation)


# --------------------------------------------------------------------------- photometric


def grayworld(image: Image.Image) -> Image.Image:
    """Gray-world white balance: scale each channel so its mean equals the mean of all three.

    Removes a global colour cast (warm indoor light on consumer photos); values are clipped to
    0..255, so heavily saturated channels end slightly below the common mean.
    """
    rgb = np.asarray(image, dtype=np.float32)
    channel_means = rgb.reshape(-1, 3).mean(axis=0)
    gains = channel_means.mean() / np.maximum(channel_means, 1e-6)  # a black channel stays black
    return Image.fromarray(np.clip(rgb * gains + 0.5, 0, 255).astype(np.uint8))


def clahe(image: Image.Image, clip_limit: float = 2.0, tile: int = 8) -> Image.Image:
    """CLAHE on the L channel of CIELAB only, so contrast is equalised but colours (a, b) stay."""
    lab = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2LAB)
    equaliser = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile, tile))
    lab[..., 0] = equaliser.apply(np.ascontiguousarray(lab[..., 0]))
    return Image.fromarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def photometric(image: Image.Image, mode: str = "none") -> Image.Image:
    """The original study's "domain normalisation", applied identically to consumer and shop images.

    ``none`` | ``clahe`` (CLAHE on luma, clip 2.0, 8×8 tiles) | ``grayworld`` |
    ``both`` (gray-world first, so CLAHE equalises the colour-corrected luma).
    """
    mode = choose(mode, PHOTOMETRIC_MODES, "photometric mode")
    if mode in ("grayworld", "both"):
        image = grayworld(image)
    if mode in ("clahe", "both"):
        image = clahe(image)
    return image


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentPreset:
    """One rung of the augmentation ladder; the table is in :func:`augmentation`."""

    flip: float  # probability of a horizontal flip
    jitter: float  # ColorJitter brightness = contrast = saturation
    min_scale: float  # RandomResizedCrop scale = (min_scale, 1.0)
    erase: float  # RandomErasing probability


AUGMENT_PRESETS = {
    "none": AugmentPreset(flip=0.0, jitter=0.0, min_scale=1.0, erase=0.0),
    "flip": AugmentPreset(flip=0.5, jitter=0.0, min_scale=1.0, erase=0.0),
    "weak": AugmentPreset(flip=0.5, jitter=0.1, min_scale=0.9, erase=0.0),
    "medium": AugmentPreset(flip=0.5, jitter=0.2, min_scale=0.8, erase=0.1),
    "strong": AugmentPreset(flip=0.5, jitter=0.3, min_scale=0.65, erase=0.25),
    "super_strong": AugmentPreset(flip=0.5, jitter=0.4, min_scale=0.5, erase=0.4),
}


def augmentation(preset: str, size: int, interpolation: str = "bicubic") -> tuple[list, list]:
    """The v2 transforms of an augmentation preset, as (before-normalise, after-normalise) lists.

    The original study's ladder, applied after the letterbox (so crops are of the padded square):

    ============  ====  ===========  =======================  ===============
    preset        flip  ColorJitter  RandomResizedCrop scale  RandomErasing p
    ============  ====  ===========  =======================  ===============
    none          --    --           --                       --
    flip          0.5   --           --                       --
    weak          0.5   0.1          (0.9, 1.0)               0
    medium        0.5   0.2          (0.8, 1.0)               0.1
    strong        0.5   0.3          (0.65, 1.0)              0.25
    super_strong  0.5   0.4          (0.5, 1.0)               0.4
    ============  ====  ===========  =======================  ===============

    ColorJitter is brightness = contrast = saturation; hue is left alone because colour is
    what tells two otherwise similar garments apart. RandomResizedCrop keeps torchvision's
    aspect range (3/4, 4/3) and resizes back to ``size``. RandomErasing runs on the normalised
    tensor with value 0, i.e. it paints the mean colour. Randomness comes from torch's global
    generator; in training, :class:`C2SDataset` seeds it per sample (see :class:`SampleSeeds`).
    """
    p = AUGMENT_PRESETS[choose(preset, tuple(AUGMENT_PRESETS), "augmentation preset")]
    before: list = []
    if p.flip > 0:
        before.append(v2.RandomHorizontalFlip(p.flip))
    if p.min_scale < 1:
        before.append(
            # An InterpolationMode, not the string: torchvision < 0.29 rejects strings here.
            v2.RandomResizedCrop(
                size,
                scale=(p.min_scale, 1.0),
                antialias=True,
                interpolation=v2.InterpolationMode(choose(interpolation, tuple(_PIL_RESAMPLE), "interpolation")),
            )
        )
    if p.jitter > 0:
        before.append(v2.ColorJitter(brightness=p.jitter, contrast=p.jitter, saturation=p.jitter))
    after = [v2.RandomErasing(p=p.erase, value=0.0)] if p.erase > 0 else []
    return before, after


# --------------------------------------------------------------------------- full transform


class C2STransform:
    """(PIL image, box) → normalised float tensor [3, size, size]; built for a run by :func:`create_transform`.

    A class rather than a closure so it pickles into DataLoader workers under any start method.
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        augment: str = "none",
        resize: str = "letterbox",
        photometric: str = "none",
        margin: float = 0.0,
        crop: bool = True,
    ):
        if img_size < 1:
            raise InputError(f"image size must be >= 1, got {img_size}")
        if margin < 0:
            raise InputError(f"box margin must be >= 0, got {margin}")
        _resample(interpolation)  # fail at build time, not in the first worker
        self.img_size, self.interpolation, self.margin, self.crop = img_size, interpolation, margin, crop
        self.resize = choose(resize, RESIZE_MODES, "resize mode")
        self.photometric = choose(photometric, PHOTOMETRIC_MODES, "photometric mode")
        self.augment = augment
        self.fill = mean_fill(mean)
        before, after = augmentation(augment, img_size, interpolation)
        self.tensor_ops = v2.Compose(
            [
                v2.ToImage(),
                *before,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
                *after,
            ]
        )

    def __call__(self, image: Image.Image, box: Sequence[float] | None = None) -> torch.Tensor:
        return self.finish(self.prepare(image, box))

    def prepare(self, image: Image.Image, box: Sequence[float] | None = None) -> Image.Image:
        """The deterministic part, the same every epoch: crop (``crop=False``: the whole photo),
        photometric normalisation, resize to ``img_size``. A store keeps its result as uint8."""
        image = crop_box(image, box if self.crop else None, self.margin)
        image = photometric(image, self.photometric)
        return resize_image(image, self.img_size, self.resize, self.interpolation, self.fill)

    def finish(self, pixels: Image.Image | np.ndarray) -> torch.Tensor:
        """Augmentation (random, from torch's generator), tensor and normalisation of a prepared
        image: a PIL image from :meth:`prepare` or the same pixels as a uint8 HWC array."""
        return self.tensor_ops(pixels)

    @property
    def prepared_fields(self) -> dict:
        """Everything :meth:`prepare`'s pixels depend on (a store is keyed by it)."""
        return {
            "img_size": self.img_size,
            "interpolation": self.interpolation,
            "resize": self.resize,
            "photometric": self.photometric,
            "margin": self.margin,
            "crop": self.crop,
            "fill": list(self.fill),
        }

    def __repr__(self) -> str:
        return (
            f"C2STransform(img_size={self.img_size}, interpolation={self.interpolation!r}, "
            f"augment={self.augment!r}, resize={self.resize!r}, photometric={self.photometric!r}, "
            f"margin={self.margin}, crop={self.crop})"
        )


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; a missing or broken file raises a one-line InputError."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:  # missing, unreadable, truncated
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise errors.at(path, None, f"cannot read image ({reason})") from None


def open_photo(
    source: str | Path | bytes | Image.Image, max_pixels: int | None = None, min_side: int = 1
) -> Image.Image:
    """A user's query photo in RGB as a viewer shows it: the one decoder of query photos, so the
    CLI ``search`` and the live demo search the same pixels.

    ``source`` is a file path, the file's bytes or an opened PIL image. The EXIF orientation is
    applied (a phone photo taken sideways is searched upright, and a query's box is given in
    those upright pixels); transparency is laid over white and 16-bit or float gray scaled to
    8 bits, where plain ``convert("RGB")`` would show transparent pixels black and clip to white.
    Dataset images are read with :func:`open_rgb` instead: their boxes refer to the stored pixels.

    ``max_pixels`` and ``min_side`` are checked on the declared size, before any pixel is
    decoded (a decompression bomb is a small file declaring a huge canvas). Bad input raises a
    one-line :class:`InputError`, naming the file when ``source`` is a path.
    """
    path = None if isinstance(source, (bytes, bytearray, memoryview, Image.Image)) else Path(source)

    def refuse(message: str) -> InputError:
        return InputError(message) if path is None else errors.at(path, None, message)

    def reason(exc: Exception) -> str:
        text = " ".join(str(exc).split())
        return (text[:120] + "…") if len(text) > 120 else (text or type(exc).__name__)

    if isinstance(source, Image.Image):
        image = source
    elif path is not None and not path.is_file():
        raise refuse("no such image file")
    else:
        try:
            with warnings.catch_warnings():
                # Pillow warns from 89 MP on; ``max_pixels`` decides, with a message.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(source)) if path is None else path)
        except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice its warning size
            raise refuse(f"the image declares too many megapixels ({reason(exc)}); use a smaller photo") from None
        except UnidentifiedImageError:
            raise refuse("this file is not an image (or not a format Pillow reads: use JPEG, PNG or WebP)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise refuse(f"the image is truncated or corrupt ({reason(exc)})") from None
    try:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise refuse(
                f"the image declares {width}×{height} = {width * height / 1e6:.0f} megapixels, more than "
                f"the {max_pixels / 1e6:.0f} MP allowed; use a smaller photo"
            )
        if min(width, height) < min_side:
            raise refuse(
                f"the image is {width}×{height} pixels: too small to show a garment (at least {min_side}×{min_side})"
            )
        image.load()
        upright = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow raises OSError for truncated or corrupt pixel data ("image file is truncated").
        raise refuse(f"the image is truncated or corrupt ({reason(exc)})") from None
    finally:
        if image is not source:
            image.close()
    if upright.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(upright, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        upright = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if upright.mode == "P" and "transparency" in upright.info:
        upright = upright.convert("RGBA")
    if upright.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = upright.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return upright.convert("RGB")


def create_transform(
    cfg: Config, data_config: dict, augment: str = "none", margin: float | None = None
) -> C2STransform:
    """The run's preprocessing: the model's input size / mean / std, the config's crop margin,
    resize mode and photometric normalisation; ``augment`` only for training."""
    return C2STransform(
        data_config["input_size"][-1],
        data_config["mean"],
        data_config["std"],
        data_config["interpolation"],
        augment=augment,
        resize=cfg.resize,
        photometric=cfg.photometric,
        margin=cfg.box_margin if margin is None else margin,
        crop=cfg.crop,
    )
