"""Synthetic consumer/shop clothing images in the official DeepFashion Consumer-to-Shop layout.

Real DeepFashion images may not be redistributed, so CI fixtures and the offline demo use this
generator instead. It writes exactly what a download holds (``Anno/list_bbox_consumer2shop.txt``,
``Anno/list_item_consumer2shop.txt``, ``Eval/list_eval_partition.txt`` and
``img/<CATEGORY>/<Subcategory>/id_XXXXXXXX/{comsumer_NN,shop_NN}.jpg``), including the quirks
the parsers must survive: the ``comsumer`` typo, items split over two subcategory folders, items
with several shop images, and box corners one pixel past the image edge.

The images carry a real domain gap. A shop image shows the garment centred and upright on a
plain light background, evenly lit. A consumer image shows the same garment warped, rotated,
rescaled, relit and colour-cast, blurred, noisy and partly occluded, on a cluttered background
(crops of scikit-image's bundled photos or procedural clutter). Items come in families that
share silhouette and base colour and differ only in pattern or details, so telling items apart
needs more than colour.

Everything is drawn from ``np.random.default_rng(seed)``: one generator plans the items and
splits, and one child generator per item (``spawn``) renders that item's images, so the same
seed gives byte-identical files, whatever the number of worker processes rendering them.

The consumer photo's nuisances can be scaled (:class:`Nuisance`: background clutter, the
wearer's occluding arm or strap, the photometric colour cast, and jitter of the written box)
for robustness experiments. Each scaled nuisance draws exactly the numbers the default draws
and scales them afterwards, so a tree at another strength shows the same items in the same
poses, and the default strengths write today's tree byte for byte.
"""

from __future__ import annotations

import colorsys
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from helpers.core.errors import InputError
from helpers.core.progress import progress_bar
from helpers.core.schema import SPLITS

MIN_ITEMS = 4  # one item per split at least, and a train split of two
LONG_SIDE = 300  # the release's low-resolution images have long side 300
CANVAS_LONG_SIDE = 256  # garments are drawn once per item at this size, then resampled
SHOP_JPEG_QUALITY = 92
CONSUMER_JPEG_QUALITY = 82  # phone photos are compressed harder than catalogue shots
NAME_WIDTH = 72  # the lists pad image names to a fixed column, as the real files do

SPLIT_FRACTIONS = (0.5, 0.25, 0.25)
SHOP_SOURCE, CONSUMER_SOURCE = 1, 2  # ``source_type`` codes of the bbox list
# Beside the lists (no DeepFashion file): each consumer photo's measured nuisances (ConsumerNuisance).
NUISANCE_FILE = "synthetic_nuisance.csv"

# category -> (clothes_type: 1 upper, 2 lower, 3 full body; silhouette drawn for it)
CATEGORIES = {
    "TOPS": (1, "top"),
    "DRESSES": (3, "dress"),
    "TROUSERS": (2, "trousers"),
    "CLOTHING": (1, "coat"),
}
# subcategory -> (category, sleeve or leg lengths it allows, canvas height/width range)
SUBCATEGORIES = {
    "Summer_Wear": ("TOPS", ("none", "short"), (0.85, 1.0)),
    "T_Shirt": ("TOPS", ("short", "long"), (0.9, 1.05)),
    "Blouse": ("TOPS", ("long", "short"), (0.95, 1.1)),
    "Lace_Dress": ("DRESSES", ("none", "short"), (1.35, 1.6)),
    "Maxi_Dress": ("DRESSES", ("none", "short", "long"), (1.8, 2.1)),
    "Pants": ("TROUSERS", ("long",), (1.6, 1.85)),
    "Shorts": ("TROUSERS", ("short",), (0.75, 0.9)),
    "Coat": ("CLOTHING", ("long",), (1.3, 1.5)),
    "Jacket": ("CLOTHING", ("long",), (1.05, 1.2)),
}
# Families take their category from this cycle: mostly tops and dresses, as in the release,
# and every category appears once four families exist (n_items >= 12 guarantees that).
FAMILY_CATEGORY_CYCLE = ("TOPS", "DRESSES", "CLOTHING", "TROUSERS", "TOPS", "DRESSES", "TOPS", "DRESSES")
FAMILY_SIZES = (2, 4)  # inclusive range of items per family
PATTERNS = ("plain", "stripes", "checks", "dots", "print", "logo")

# Quirks sit at fixed item positions so that any tree of >= 12 items holds each of them.
TWO_FOLDER_EVERY, TWO_FOLDER_AT = 8, 5  # images under two subcategory folders
MULTI_SHOP_EVERY, MULTI_SHOP_AT = 6, 2  # 2-3 shop images instead of one
OVERSHOOT_EVERY, OVERSHOOT_AT = 5, 1  # first consumer box one pixel past the image edge

# box_jitter at strength 1: the box centre moves by N(0, 0.1) of the box's width / height and
# each side is rescaled by exp(N(0, 0.1)), about a detector's error (median IoU with the true
# box 0.73 for a box clear of the image edges); the strength multiplies both standard deviations.
JITTER_SHIFT, JITTER_SCALE = 0.1, 0.1

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "horse")
SKIN_TONES = ((241, 194, 167), (224, 172, 138), (198, 134, 94), (141, 85, 54), (92, 58, 40))


@dataclass(frozen=True)
class Item:
    """Everything that identifies one synthetic item; images are rendered from it."""

    item_id: str
    category: str
    subcategory: str
    second_subcategory: str | None  # folder of comsumer_01 when the item spans two folders
    aspect: float  # garment canvas height / width
    flare: float  # how much the hem widens
    neck_depth: float
    length: str  # sleeve length ("none"/"short"/"long"), or leg length for trousers
    base: tuple[int, int, int]
    accent: tuple[int, int, int]
    pattern: str
    collar: bool
    pocket: bool
    buttons: bool
    hem_band: bool
    n_consumer: int
    n_shop: int
    overshoot: bool

    @property
    def clothes_type(self) -> int:
        return CATEGORIES[self.category][0]

    @property
    def silhouette(self) -> str:
        return CATEGORIES[self.category][1]


@dataclass(frozen=True)
class Nuisance:
    """How strong each consumer-photo nuisance is: 1 as the generator always drew it, 0 none, 2
    twice as strong. ``clutter`` scales the background's contrast around its mean colour (0: a
    flat background); ``occlusion`` the width of the wearer's arm or bag strap across the
    garment (0: none; the head and shirt around it are context and stay); ``colour_cast`` the
    directional light, the per-channel cast with exposure and the gamma, in log terms (0:
    neutral; blur and sensor noise stay); ``box_jitter`` the error of the written consumer box
    (:data:`JITTER_SHIFT`, :data:`JITTER_SCALE`; the image is unchanged). The default box is the
    exact one, so ``box_jitter`` defaults to 0."""

    clutter: float = 1.0
    occlusion: float = 1.0
    colour_cast: float = 1.0
    box_jitter: float = 0.0

    @classmethod
    def from_strengths(cls, strengths: dict[str, float] | None) -> Nuisance:
        """From ``{"clutter": 0.5, ...}`` (missing keys keep the default); InputError on an
        unknown key or a strength that is not a finite number >= 0."""
        strengths = dict(strengths or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(strengths) - set(names))
        if unknown:
            raise InputError(f"unknown nuisance {', '.join(unknown)}; choose from {', '.join(names)}")
        for name, value in strengths.items():
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < 0:
                raise InputError(f"nuisance {name} must be a finite number >= 0, got {value!r}")
        return cls(**{name: float(value) for name, value in strengths.items()})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Record:
    """One image: its path relative to the root, domain and box (x_2, y_2 exclusive)."""

    path: str
    item_id: str
    source_type: int
    clothes_type: int
    box: tuple[int, int, int, int]
    measured: ConsumerNuisance | None = None  # consumer photos: their nuisances, as measured


@dataclass(frozen=True)
class ConsumerNuisance:
    """What one consumer photo's nuisances came to, measured as it was drawn (written to
    :data:`NUISANCE_FILE`, so failures can be grouped by them): ``occluded_share``, the share of
    the garment's pixels the wearer's arm or strap hides; ``background_contrast``, the standard
    deviation of the background's grey level (0-1) before the garment is pasted; ``colour_cast``,
    the spread of the per-channel gains in log terms (0: a neutral cast)."""

    occluded_share: float
    background_contrast: float
    colour_cast: float


# ---------------------------------------------------------------------------------------------
# Planning: families, items, quirks, splits
# ---------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A garment colour: any hue, never so pale that it vanishes on a light shop background."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.25, 0.9), rng.uniform(0.3, 0.85))
    return tuple(int(round(255 * c)) for c in rgb)


def _accent_colour(base: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour that contrasts with ``base`` (white, black or the opposite hue) for patterns."""
    choice = rng.integers(3)
    if choice == 0:
        return (240, 240, 235)
    if choice == 1:
        return (30, 30, 35)
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in base))
    rgb = colorsys.hsv_to_rgb((h + 0.5) % 1.0, max(s, 0.5), 1.0 - 0.6 * v)
    return tuple(int(round(255 * c)) for c in rgb)


def _plan_items(n_items: int, rng: np.random.Generator) -> list[Item]:
    """Draw the items family by family; members share silhouette and base colour."""
    items: list[Item] = []
    family = 0
    while len(items) < n_items:
        category = FAMILY_CATEGORY_CYCLE[family % len(FAMILY_CATEGORY_CYCLE)]
        subcats = [s for s, spec in SUBCATEGORIES.items() if spec[0] == category]
        subcategory = subcats[rng.integers(len(subcats))]
        _, lengths, aspect_range = SUBCATEGORIES[subcategory]
        shared = dict(
            category=category,
            subcategory=subcategory,
            aspect=float(rng.uniform(*aspect_range)),
            flare=float(rng.uniform(0.0, 0.2)),
            neck_depth=float(rng.uniform(0.06, 0.2)),
            base=_random_colour(rng),
        )
        # Distinct patterns within a family: members must differ in more than their details.
        patterns = rng.permutation(PATTERNS)
        size = int(rng.integers(FAMILY_SIZES[0], FAMILY_SIZES[1] + 1))
        for member in range(min(size, n_items - len(items))):
            index = len(items)
            others = [s for s in subcats if s != subcategory]
            two_folders = index % TWO_FOLDER_EVERY == TWO_FOLDER_AT
            multi_shop = index % MULTI_SHOP_EVERY == MULTI_SHOP_AT
            items.append(
                Item(
                    item_id=f"id_{index + 1:08d}",
                    second_subcategory=others[rng.integers(len(others))] if two_folders else None,
                    length=str(lengths[rng.integers(len(lengths))]),
                    accent=_accent_colour(shared["base"], rng),
                    pattern=str(patterns[member]),
                    collar=bool(rng.random() < 0.5),
                    pocket=bool(rng.random() < 0.4),
                    buttons=bool(rng.random() < 0.4),
                    hem_band=bool(rng.random() < 0.4),
                    n_consumer=int(rng.integers(1, 7)),
                    n_shop=int(rng.integers(2, 4)) if multi_shop else 1,
                    overshoot=index % OVERSHOOT_EVERY == OVERSHOOT_AT,
                    **shared,
                )
            )
        family += 1
    return items


def _assign_splits(n_items: int, rng: np.random.Generator, splits: tuple[int, int, int] | None) -> list[str]:
    """Give each item one split: ``splits`` items each, or about 50/25/25 %, every split non-empty."""
    if splits is None:
        n_val = max(1, round(n_items * SPLIT_FRACTIONS[1]))
        n_test = max(1, round(n_items * SPLIT_FRACTIONS[2]))
    else:
        n_val, n_test = splits[1], splits[2]
    labels = ["train"] * (n_items - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return [labels[i] for i in rng.permutation(n_items)]


# ---------------------------------------------------------------------------------------------
# Drawing one garment (once per item, on a transparent canvas)
# ---------------------------------------------------------------------------------------------


def _upper_body_half(item: Item, shoulder: float) -> list[tuple[float, float]]:
    """Right half of an upper-body outline, neck to armpit, in width units (x in [0, 1])."""
    points = [(0.59, 0.02)]
    if item.length == "none":
        points += [(0.67, 0.03), (0.68, 0.17), (0.73, 0.28)]
    elif item.length == "short":
        points += [(0.5 + shoulder, 0.07), (0.93, 0.3), (0.84, 0.38), (0.73, 0.28)]
    else:  # long sleeves hang down and out, leaving a gap beside the body
        points += [(0.5 + shoulder, 0.07), (0.98, 0.88), (0.87, 0.91), (0.73, 0.28)]
    return points


def _outline(item: Item) -> list[tuple[float, float]]:
    """The garment outline as a closed polygon in width units (y runs from 0 to ``aspect``)."""
    h = item.aspect
    if item.silhouette == "trousers":
        outer, inner, crotch = (0.37, 0.08, 0.45 * h) if item.length == "short" else (0.3, 0.05, 0.3 * h)
        right = [(0.8, 0.0), (0.84, 0.3 * min(h, 1.0)), (0.5 + outer, h), (0.5 + inner, h)]
        left = [(1.0 - x, y) for x, y in reversed(right)]
        return right + [(0.5, crotch)] + left
    if item.silhouette == "top":
        body = [(0.71, 0.6 * h), (0.72 + 0.5 * item.flare, h)]
    elif item.silhouette == "dress":
        body = [(0.66, 0.45), (0.72 + item.flare, h)]
    else:  # coat: broad shoulders, straight long body
        body = [(0.74, 0.6), (0.76 + 0.3 * item.flare, h)]
    right = _upper_body_half(item, 0.25 if item.silhouette == "coat" else 0.23) + body
    left = [(1.0 - x, y) for x, y in reversed(right)]
    return [(0.5, item.neck_depth)] + right + left


def _pattern(item: Item, canvas: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Where the accent colour shows, as a float mask in [0, 1] over the canvas (vectorised)."""
    w, h = canvas
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(0.06, 0.12) * w

    def stripes(angle: float) -> np.ndarray:
        # A square wave with one-pixel soft edges, so stripes survive resampling without aliasing.
        t = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
        return np.clip(t * period / 4 + 0.5, 0.0, 1.0)

    if item.pattern == "plain":
        return np.zeros((h, w), np.float32)
    if item.pattern == "stripes":
        return stripes(float(rng.choice([0.0, np.pi / 2, np.pi / 4])) + np.pi / 2)
    if item.pattern == "checks":  # gingham: the two stripe sets blend to three tones
        return 0.5 * (stripes(0.0) + stripes(np.pi / 2))
    if item.pattern == "dots":
        gx, gy = x / period, y / period
        gx = gx + 0.5 * (np.floor(gy) % 2)  # staggered rows
        d = np.hypot(gx - np.floor(gx) - 0.5, gy - np.floor(gy) - 0.5) * period
        return np.clip(0.22 * period - d + 0.5, 0.0, 1.0)
    mask = Image.new("L", canvas, 0)
    draw = ImageDraw.Draw(mask)
    if item.pattern == "print":  # scattered small motifs, like a floral print
        for _ in range(int(w * h / (period * period) * 0.6)):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.2, 0.4) * period
            draw.ellipse([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=255)
    else:  # logo: one emblem on the chest (on the thigh for trousers)
        cx = w * (0.32 if item.silhouette == "trousers" else 0.5)
        cy = w * (0.3 if item.silhouette != "dress" else 0.27)
        r = w * rng.uniform(0.08, 0.13)
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
        elif shape == 1:
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
        else:
            radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)  # five-pointed star
            angles = np.arange(10) * np.pi / 5
            draw.polygon(list(zip(cx + radii * np.sin(angles), cy - radii * np.cos(angles))), fill=255)
    return np.asarray(mask, np.float32) / 255.0


def _draw_details(item: Item, texture: Image.Image, scale: float) -> None:
    """Collar, pocket, buttons and hem band, drawn onto the texture in width units * scale."""
    draw = ImageDraw.Draw(texture)

    def px(points):
        return [(x * scale, y * scale) for x, y in points]

    dark = tuple(int(0.6 * c) for c in item.base)
    h = item.aspect
    if item.silhouette == "trousers":  # trousers always have a waistband and a fly seam
        draw.rectangle(px([(0.0, 0.0), (1.0, 0.06)]), fill=dark)
        draw.line(px([(0.5, 0.06), (0.5, 0.3 * min(h, 1.0))]), fill=dark, width=max(1, int(0.01 * scale)))
    if item.silhouette == "coat":  # a coat is open down the front
        draw.line(px([(0.5, item.neck_depth), (0.5, h)]), fill=dark, width=max(2, int(0.015 * scale)))
    if item.collar and item.silhouette != "trousers":
        d = item.neck_depth
        for sign in (-1, 1):
            draw.polygon(
                px([(0.5, d + 0.02), (0.5 + sign * 0.1, 0.0), (0.5 + sign * 0.17, 0.1), (0.5 + sign * 0.03, d + 0.1)]),
                fill=item.accent,
                outline=dark,
            )
    if item.pocket:
        x0, y0 = (0.22, 0.16) if item.silhouette == "trousers" else (0.57, 0.32)
        draw.rectangle(px([(x0, y0), (x0 + 0.13, y0 + 0.14)]), outline=dark, width=max(2, int(0.012 * scale)))
        draw.rectangle(px([(x0, y0), (x0 + 0.13, y0 + 0.035)]), fill=dark)
    if item.buttons and item.silhouette != "trousers":
        x = 0.53 if item.silhouette == "coat" else 0.5
        for y in np.linspace(item.neck_depth + 0.08, min(h, 1.0) - 0.08, 5):
            draw.ellipse(px([(x - 0.015, y - 0.015), (x + 0.015, y + 0.015)]), fill=item.accent, outline=dark)
    if item.hem_band:
        draw.rectangle(px([(0.0, h - 0.07), (1.0, h)]), fill=dark)


def _canvas_scale(item: Item) -> float:
    """Canvas pixels per garment width unit: the canvas's long side is ``CANVAS_LONG_SIDE``."""
    return CANVAS_LONG_SIDE / max(1.0, item.aspect)


def _render_garment(item: Item, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Draw the item once: an RGBA canvas and its outline polygon in canvas pixels."""
    scale = _canvas_scale(item)
    canvas = (int(round(scale)), int(round(scale * item.aspect)))
    outline = np.array(_outline(item)) * scale

    mask_img = Image.new("L", canvas, 0)
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in outline], fill=255)
    mask_img = mask_img.filter(ImageFilter.GaussianBlur(0.6))  # soft, anti-aliased edge
    mask = np.asarray(mask_img, np.float32) / 255.0

    p = _pattern(item, canvas, rng)[..., None]
    colour = (1 - p) * np.array(item.base, np.float32) + p * np.array(item.accent, np.float32)
    texture = Image.fromarray(colour.clip(0, 255).astype(np.uint8))
    _draw_details(item, texture, scale)

    # Fabric shading: soft vertical folds, and darker edges so the garment reads as 3-D.
    w, h = canvas
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    folds = 1.0 + 0.06 * np.sin(2 * np.pi * (x / w * rng.uniform(3, 6) + 0.3 * np.sin(2 * np.pi * y / h)))
    inner = np.asarray(mask_img.filter(ImageFilter.GaussianBlur(6)), np.float32) / 255.0
    seam = np.asarray(mask_img.filter(ImageFilter.MinFilter(5)), np.float32) / 255.0
    shade = folds * (0.72 + 0.28 * inner) * (0.65 + 0.35 * seam)
    rgb = np.asarray(texture, np.float32) * shade[..., None]
    rgba = np.dstack([rgb.clip(0, 255), mask * 255]).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA"), outline


# ---------------------------------------------------------------------------------------------
# Shop and consumer photographs
# ---------------------------------------------------------------------------------------------


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """Width, height with long side 300: mostly portrait, sometimes landscape, aspect kept."""
    short = int(rng.integers(200, LONG_SIDE + 1))
    return (short, LONG_SIDE) if rng.random() < 0.75 else (LONG_SIDE, short)


def _alpha_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """Box of the visible garment (alpha > 0.5) as x_1, y_1, x_2, y_2 with exclusive x_2, y_2."""
    ys, xs = np.nonzero(alpha > 127)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _render_shop(garment: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, tuple]:
    """Catalogue shot: garment centred and upright on a plain light background, evenly lit."""
    w, h = _image_size(rng)
    fit = rng.uniform(0.76, 0.9) * min(w / garment.width, h / garment.height)
    gw, gh = max(1, round(garment.width * fit)), max(1, round(garment.height * fit))
    layer = garment.resize((gw, gh), Image.LANCZOS)
    left = (w - gw) // 2 + int(rng.integers(-3, 4))
    top = (h - gh) // 2 + int(rng.integers(-3, 4))

    tone = rng.uniform(236, 250) + rng.uniform(-3, 3, size=3)
    image = Image.new("RGB", (w, h), tuple(int(c) for c in tone))
    # A faint drop shadow, as on a product photo; it stays well inside the light range.
    shadow = Image.new("L", (w, h), 0)
    shadow.paste(layer.getchannel("A"), (left + 4, top + 5))
    shadow = shadow.filter(ImageFilter.GaussianBlur(6)).point(lambda v: v * 30 // 255)
    image.paste((0, 0, 0), (0, 0), shadow)
    image.paste(layer, (left, top), layer)

    alpha = np.zeros((h, w), np.uint8)
    alpha[top : top + gh, left : left + gw] = np.asarray(layer.getchannel("A"))
    return image, _alpha_box(alpha)


@cache
def _photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photos as RGB, loaded once per process."""
    from skimage import data

    array = np.asarray(getattr(data, name)())
    if array.dtype == bool:  # ``horse`` is a binary silhouette: make it a grey photo
        array = np.where(array, 200, 60).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(array[..., :3].astype(np.uint8))


def _cluttered_background(size: tuple[int, int], rng: np.random.Generator, clutter: float = 1.0) -> Image.Image:
    """A busy scene: a random crop of a bundled photo or a gradient, plus random objects, its
    contrast around the mean colour scaled by ``clutter`` (drawn the same at any strength)."""
    w, h = size
    if rng.random() < 0.6:
        photo = _photo(PHOTO_NAMES[rng.integers(len(PHOTO_NAMES))])
        cw = int(rng.uniform(0.4, 1.0) * photo.width)
        ch = min(photo.height, int(cw * h / w))
        x0, y0 = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        image = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        n_objects = int(rng.integers(0, 5))
    else:
        top, bottom = rng.uniform(40, 220, size=3), rng.uniform(40, 220, size=3)
        ramp = np.linspace(0.0, 1.0, h)[:, None, None]  # one column, stretched to full width
        image = Image.fromarray((top + (bottom - top) * ramp).astype(np.uint8)).resize((w, h), Image.NEAREST)
        n_objects = int(rng.integers(10, 25))
    draw = ImageDraw.Draw(image)
    for _ in range(n_objects):
        x0, y0 = rng.uniform(-0.2 * w, w), rng.uniform(-0.2 * h, h)
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.5) * h
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif shape == 1:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            draw.line([x0, y0, x1, y1], fill=fill, width=int(rng.integers(2, 12)))
    # The garment is the subject in focus; the scene behind it is not.
    image = image.filter(ImageFilter.BoxBlur(rng.uniform(0.5, 2.0)))
    if clutter == 1.0:
        return image
    rgb = np.asarray(image, np.float32)
    mean = rgb.mean(axis=(0, 1))
    return Image.fromarray((mean + clutter * (rgb - mean)).round().clip(0, 255).astype(np.uint8))


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking four ``src`` points to four ``dst`` points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.append(np.linalg.solve(np.array(rows), np.array(rhs)), 1.0).reshape(3, 3)


def _apply(hom: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a homography."""
    p = np.c_[points, np.ones(len(points))] @ hom.T
    return p[:, :2] / p[:, 2:]


def _consumer_pose(
    garment: Image.Image, outline: np.ndarray, size: tuple[int, int], overshoot: bool, rng: np.random.Generator
) -> np.ndarray:
    """Homography from the garment canvas into a consumer photo: scale, rotation, perspective.

    With ``overshoot`` the garment is pushed past the right or bottom edge, which is where the
    real lists carry box corners one pixel outside the image.
    """
    w, h = size
    gw, gh = garment.size
    corners = np.array([[0, 0], [gw, 0], [gw, gh], [0, gh]], float)
    fit = rng.uniform(0.5, 0.85) * min(w / gw, h / gh)
    angle = np.deg2rad(rng.uniform(-25, 25))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = (corners - [gw / 2, gh / 2]) * fit @ rot.T
    dst += rng.normal(0.0, 0.06 * fit * max(gw, gh), size=dst.shape)  # camera perspective
    hom = _homography(corners, dst)

    # Place the garment by its true outline, not its canvas, so boxes land where intended.
    shape = _apply(hom, outline)
    lo, hi = shape.min(axis=0), shape.max(axis=0)
    if overshoot:
        axis = int(rng.integers(2))
        limit = (w, h)[axis]
        shift = np.array([(w - (hi[0] - lo[0])) / 2 - lo[0], (h - (hi[1] - lo[1])) / 2 - lo[1]])
        shift[axis] = limit + rng.uniform(8, 30) - hi[axis]
    else:
        room = np.maximum(np.array([w, h]) - (hi - lo), 0.0)
        shift = -lo + rng.uniform(0.0, 1.0, size=2) * room
    return np.array([[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]]) @ hom


def _wearer(
    draw: ImageDraw.ImageDraw,
    item: Item,
    hom: np.ndarray,
    scale: float,
    rng: np.random.Generator,
    occlusion: float = 1.0,
) -> tuple | None:
    """The person wearing the garment, drawn over and around it; returns the arm or strap
    ``(start, end, width)`` it drew, None when ``occlusion`` left none.

    A head above the neckline (or a shirt above the waistband of trousers) puts the garment in
    context, and an arm or bag strap across it occludes part of it, as in consumer photos; its
    width is scaled by ``occlusion`` (0: no arm), drawn the same at any strength.
    """

    def at(u: float, v: float) -> np.ndarray:  # garment width units -> photo pixels
        return _apply(hom, np.array([[u, v]]) * scale)[0]

    unit = float(np.linalg.norm(at(1.0, 0.0) - at(0.0, 0.0)))  # one garment width in pixels
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    if item.silhouette == "trousers":
        shirt = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.polygon([tuple(at(u, v)) for u, v in ((0.12, -0.7), (0.88, -0.7), (0.85, 0.03), (0.15, 0.03))], fill=shirt)
    else:
        neck, chest = at(0.5, 0.0), at(0.5, 0.2)
        head = neck + 1.2 * (neck - chest)  # up the garment's own axis, so it tilts with it
        r = 0.13 * unit
        draw.line([tuple(neck), tuple(head)], fill=skin, width=max(2, int(0.6 * r)))
        draw.ellipse([head[0] - r, head[1] - 1.25 * r, head[0] + r, head[1] + 1.25 * r], fill=skin)
        hair = tuple(int(c) for c in rng.integers(10, 120, size=3))
        draw.chord([head[0] - 1.1 * r, head[1] - 1.45 * r, head[0] + 1.1 * r, head[1] + 0.3 * r], 180, 360, fill=hair)
    start = at(float(rng.choice([-0.15, 1.15])), rng.uniform(0.1, 0.4) * item.aspect)
    end = at(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.8) * item.aspect)
    width = max(4, int(rng.uniform(0.1, 0.16) * unit))
    colour = skin if rng.random() < 0.7 else tuple(int(c) for c in rng.integers(0, 256, size=3))
    if occlusion != 1.0:
        width = int(round(width * occlusion))
        if width < 1:
            return None
    arm = (tuple(start), tuple(end), width)
    _draw_arm(draw, arm, colour)
    return arm


def _draw_arm(draw: ImageDraw.ImageDraw, arm: tuple, fill) -> None:
    """The arm or strap ``(start, end, width)``: a line ending in a hand."""
    start, end, width = arm
    draw.line([start, end], fill=fill, width=width)
    draw.ellipse([end[0] - 0.6 * width, end[1] - 0.6 * width, end[0] + 0.6 * width, end[1] + 0.6 * width], fill=fill)


def _photometric(image: Image.Image, rng: np.random.Generator, colour_cast: float = 1.0) -> tuple[Image.Image, float]:
    """Phone-camera look: blur, directional light, colour cast, exposure, noise and gamma; the
    light, cast, exposure and gamma scaled by ``colour_cast`` in log terms (drawn the same at
    any strength). Returns the photo and its cast's spread (:class:`ConsumerNuisance`)."""
    w, h = image.size
    a = rng.uniform(0, 2 * np.pi)
    x = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    y = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    slope = rng.uniform(0.15, 0.45)
    cast = (rng.uniform(0.78, 1.22, size=3) * rng.uniform(0.7, 1.15)).astype(np.float32)
    rgb = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6))), np.float32)
    # Sensor noise is drawn per pixel, not per channel: half the cost, and it looks the same
    # once JPEG has subsampled the colour.
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(1.5, 6.0))
    gamma = rng.uniform(0.8, 1.25)
    if colour_cast != 1.0:  # every draw above is made at any strength: the same photo, scaled
        slope, cast, gamma = slope * colour_cast, (cast**colour_cast).astype(np.float32), gamma**colour_cast
    light = 1.0 + np.float32(slope) * (x * np.cos(a) + y * np.sin(a))
    rgb = rgb * (light[..., None] * cast) + noise[..., None]
    curve = (255.0 * (np.arange(256) / 255.0) ** gamma).round().astype(np.uint8)
    return Image.fromarray(curve[rgb.clip(0, 255).astype(np.uint8)]), float(np.ptp(np.log(cast)))


def _render_consumer(
    item: Item,
    garment: Image.Image,
    outline: np.ndarray,
    overshoot: bool,
    rng: np.random.Generator,
    nuisance: Nuisance = Nuisance(),
) -> tuple[Image.Image, tuple, ConsumerNuisance]:
    """Street photo: the garment worn, warped and rotated, in a cluttered scene, partly hidden;
    with its box and its measured nuisances."""
    size = _image_size(rng)
    hom = _consumer_pose(garment, outline, size, overshoot, rng)
    if rng.random() < 0.3:  # mirror selfie: pocket and logo swap sides
        garment = garment.transpose(Image.FLIP_LEFT_RIGHT)
    coeffs = np.linalg.inv(hom)  # PIL maps output pixels back to input pixels
    warped = garment.transform(size, Image.PERSPECTIVE, tuple((coeffs / coeffs[2, 2]).ravel()[:8]), Image.BILINEAR)
    box = _alpha_box(np.asarray(warped.getchannel("A")))  # the whole garment, occluded or not

    image = _cluttered_background(size, rng, nuisance.clutter)
    contrast = float(np.asarray(image.convert("L"), np.float32).std() / 255.0)
    image.paste(warped, (0, 0), warped)
    arm = _wearer(ImageDraw.Draw(image), item, hom, _canvas_scale(item), rng, nuisance.occlusion)
    photo, cast = _photometric(image, rng, nuisance.colour_cast)
    return photo, box, ConsumerNuisance(_occluded_share(warped, arm), contrast, cast)


def _occluded_share(warped: Image.Image, arm: tuple | None) -> float:
    """The share of the garment's pixels (alpha > 127) that ``arm`` covers."""
    garment = np.asarray(warped.getchannel("A")) > 127
    if arm is None or not garment.any():
        return 0.0
    mask = Image.new("L", warped.size, 0)
    _draw_arm(ImageDraw.Draw(mask), arm, 255)
    return float((np.asarray(mask) > 0)[garment].mean())


def _jittered_box(box: tuple, size: tuple[int, int], z: np.ndarray, strength: float) -> tuple[int, int, int, int]:
    """``box`` as a detector or a shopper would draw it: its centre shifted and its sides
    rescaled by ``strength`` × the jitter's standard deviations × ``z`` (4 standard normals),
    clipped to the image, at least 2 px a side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + strength * JITTER_SHIFT * w * z[0]
    cy = (y1 + y2) / 2 + strength * JITTER_SHIFT * h * z[1]
    w, h = w * math.exp(strength * JITTER_SCALE * z[2]), h * math.exp(strength * JITTER_SCALE * z[3])
    width, height = size
    nx1 = int(np.clip(round(cx - w / 2), 0, width - 2))
    ny1 = int(np.clip(round(cy - h / 2), 0, height - 2))
    nx2 = int(np.clip(round(cx + w / 2), nx1 + 2, width))
    ny2 = int(np.clip(round(cy + h / 2), ny1 + 2, height))
    return nx1, ny1, nx2, ny2


# ---------------------------------------------------------------------------------------------
# Writing the tree
# ---------------------------------------------------------------------------------------------


def _save_jpeg(image: Image.Image, path: Path, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=quality, optimize=False)


def _render_item(
    root: Path,
    item: Item,
    rng: np.random.Generator,
    nuisance: Nuisance = Nuisance(),
    jitter_rng: np.random.Generator | None = None,
) -> list[Record]:
    """Render and save one item's shop and consumer images; return their bbox records.
    ``jitter_rng`` draws the box jitter (its own stream, so the images never depend on it)."""
    garment, outline = _render_garment(item, rng)
    jitter = None
    if nuisance.box_jitter > 0:
        jitter = (jitter_rng or rng.spawn(1)[0]).standard_normal((item.n_consumer, 4))
    folder = f"img/{item.category}/{item.subcategory}/{item.item_id}"
    records = []
    for k in range(1, item.n_consumer + 1):
        sub = item.second_subcategory if (item.second_subcategory and k == 1) else item.subcategory
        path = f"img/{item.category}/{sub}/{item.item_id}/comsumer_{k:02d}.jpg"
        overshoot = item.overshoot and k == 1
        image, box, measured = _render_consumer(item, garment, outline, overshoot, rng, nuisance)
        if overshoot:  # the real lists put such corners one pixel past the edge
            x1, y1, x2, y2 = box
            box = (x1, y1, x2 + (x2 == image.width), y2 + (y2 == image.height))
        if jitter is not None:
            box = _jittered_box(box, image.size, jitter[k - 1], nuisance.box_jitter)
        _save_jpeg(image, root / path, CONSUMER_JPEG_QUALITY)
        records.append(Record(path, item.item_id, CONSUMER_SOURCE, item.clothes_type, box, measured))
    for k in range(1, item.n_shop + 1):
        path = f"{folder}/shop_{k:02d}.jpg"
        image, box = _render_shop(garment, rng)
        _save_jpeg(image, root / path, SHOP_JPEG_QUALITY)
        records.append(Record(path, item.item_id, SHOP_SOURCE, item.clothes_type, box))
    return records


def _render_job(job: tuple) -> list[Record]:
    """:func:`_render_item` of one ``(root, item, rng, nuisance, jitter_rng)``, in a worker process."""
    return _render_item(*job)


def _render_all(jobs: list[tuple], workers: int, progress: bool) -> list[Record]:
    """Every job's records, in job order, rendered by ``workers`` processes (1: in this one).
    Each item draws from its own generator, so the files do not depend on ``workers``."""
    bar = dict(total=len(jobs), desc="synthetic items", unit="item", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        return [record for job in progress_bar(jobs, **bar) for record in _render_item(*job)]
    # fork on Linux (as torch's loaders do): spawn would re-run a caller's script that lacks a
    # __main__ guard; the workers only use numpy and PIL, never the caller's threads.
    context = get_context("fork" if sys.platform.startswith("linux") else None)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        done = progress_bar(pool.map(_render_job, jobs), **bar)
        return [record for records in done for record in records]


def _write_list(path: Path, header: str | None, rows: list[str]) -> None:
    """A list file as released: count line, optional column-name line, one row per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows))] + ([header] if header else []) + rows
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_lists(root: Path, records: list[Record], split_of: dict[str, str]) -> list[tuple]:
    """Write the bbox, item and partition lists; return the partition's (consumer, shop, item, split) rows."""
    width = max(NAME_WIDTH, max(len(r.path) for r in records) + 2)
    _write_list(
        root / "Anno/list_bbox_consumer2shop.txt",
        "image_name clothes_type source_type x_1 y_1 x_2 y_2",
        [
            f"{r.path:<{width}}{r.clothes_type:<3d}{r.source_type:<3d}" + " ".join(f"{v:03d}" for v in r.box)
            for r in records
        ],
    )
    _write_list(root / "Anno/list_item_consumer2shop.txt", None, list(split_of))

    pairs = []
    for item_id, split in split_of.items():
        consumer = [r.path for r in records if r.item_id == item_id and r.source_type == CONSUMER_SOURCE]
        shop = [r.path for r in records if r.item_id == item_id and r.source_type == SHOP_SOURCE]
        pairs += [(c, s, item_id, split) for c in consumer for s in shop]
    _write_list(
        root / "Eval/list_eval_partition.txt",
        "image_pair_name_1 image_pair_name_2 item_id evaluation_status",
        [f"{c:<{width}}{s:<{width}}{i}  {split}" for c, s, i, split in pairs],
    )
    return pairs


def _write_nuisance(path: Path, records: list[Record]) -> None:
    """:data:`NUISANCE_FILE`: one row per consumer photo, its path and measured nuisances."""
    columns = [f.name for f in fields(ConsumerNuisance)]
    rows = [",".join(["path", *columns])] + [
        ",".join([r.path, *(f"{getattr(r.measured, c):.6f}" for c in columns)]) for r in records if r.measured
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def read_nuisance(root: str | Path) -> pd.DataFrame | None:
    """A generated tree's :data:`NUISANCE_FILE` (``path`` and the :class:`ConsumerNuisance`
    columns), or None where the tree has none (DeepFashion, or a tree written before it existed)."""
    path = Path(root) / NUISANCE_FILE
    return pd.read_csv(path) if path.is_file() else None


def _counts(items: list[Item], split_of: dict[str, str], pairs: list[tuple]) -> dict:
    """The summary ``generate_tree`` returns, computed from the plan and the written pairs."""

    def tally(selected: list[Item], split: str | None) -> dict:
        return {
            "items": len(selected),
            "consumer_images": sum(i.n_consumer for i in selected),
            "shop_images": sum(i.n_shop for i in selected),
            "pairs": sum(1 for p in pairs if split is None or p[3] == split),
        }

    summary = tally(items, None)
    summary["per_split"] = {s: tally([i for i in items if split_of[i.item_id] == s], s) for s in SPLITS}
    summary["categories"] = {c: sum(i.category == c for i in items) for c in CATEGORIES}
    return summary


def generate_tree(
    root,
    n_items: int = 300,
    seed: int = 0,
    progress: bool = True,
    splits: tuple[int, int, int] | None = None,
    nuisance: dict[str, float] | None = None,
    only_splits: tuple[str, ...] | None = None,
    workers: int | None = None,
) -> dict:
    """Write a synthetic Consumer-to-Shop tree of ``n_items`` items under ``root``.

    ``splits``: items of train, val and test (summing to ``n_items``); None: about 50/25/25 %.
    ``nuisance``: strengths of the consumer photos' nuisances (:class:`Nuisance`; None: the
    default, today's tree). ``only_splits``: write only the items of these splits (images and
    lists), the same items as in the whole tree, e.g. a val-only tree to evaluate on.
    ``workers``: processes rendering items (default ``min(2, os.cpu_count())``); the files are
    the same for any number.

    ``root`` must not exist or be an empty folder: nothing a user has is overwritten. Images
    are written first and the lists last, so an interrupted run leaves no readable lists.
    Returns counts: items, consumer_images, shop_images, pairs, per_split (the same four per
    split) and categories (items per category).
    """
    root = Path(root)
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < MIN_ITEMS:
        raise InputError(f"number of items must be an integer >= {MIN_ITEMS}, got {n_items!r}")
    if splits is not None and (len(splits) != 3 or sum(splits) != n_items or splits[0] < 2 or min(splits[1:]) < 1):
        raise InputError(f"splits must be (train >= 2, val >= 1, test >= 1) items summing to {n_items}, got {splits!r}")
    strengths = Nuisance.from_strengths(nuisance)
    if only_splits is not None and (not only_splits or set(only_splits) - set(SPLITS)):
        raise InputError(f"only_splits must name some of {', '.join(SPLITS)}, got {only_splits!r}")
    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InputError(f"{root}: exists and is not an empty folder; choose a new output folder")

    rng = np.random.default_rng(seed)
    items = _plan_items(int(n_items), rng)
    split_of = dict(zip((i.item_id for i in items), _assign_splits(len(items), rng, splits)))
    item_rngs = rng.spawn(len(items))
    jitter_rngs = rng.spawn(len(items))  # spawned after the items': their streams stay the same

    if only_splits is not None:  # the same items and generators, the others left out
        kept = [i for i, item in enumerate(items) if split_of[item.item_id] in only_splits]
        items, item_rngs, jitter_rngs = ([seq[i] for i in kept] for seq in (items, item_rngs, jitter_rngs))
        split_of = {item.item_id: split_of[item.item_id] for item in items}

    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root, item, r, strengths, j) for item, r, j in zip(items, item_rngs, jitter_rngs)]
    records = _render_all(jobs, workers, progress)
    _write_nuisance(root / NUISANCE_FILE, records)
    pairs = _write_lists(root, records, split_of)
    return _counts(items, split_of, pairs)
