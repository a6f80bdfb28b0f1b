"""Images in, normalised tensors out: box crop, resize, photometric normalisation,
augmentation presets, the dataset over ``images.csv`` and a domain-aware P×K batch sampler.

One image goes through ``crop_box`` (box + margin) → ``photometric`` → ``resize_image``
(letterbox by default) → augmentation preset → tensor + Normalize (+ RandomErasing).
:func:`build_transform` assembles that chain; :class:`C2SDataset` feeds it one table row at a
time; :class:`PKSampler` groups rows into batches of P items × K images so that every item in
a batch brings both a consumer and a shop photo; :func:`make_loader` wraps it all in a seeded
``DataLoader``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from . import errors
from .errors import InputError, choose
from .repro import torch_generator, worker_init_fn
from .schema import BOX_COLUMNS, DOMAINS, IMAGE_COLUMNS, check_columns

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
    canvas of colour ``fill``. Garments keep their shape (the seed's squash made a long dress
    and a T-shirt look alike)."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = image.resize(new_size, _resample(interpolation))
    canvas = Image.new("RGB", (size, size), tuple(fill))
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def squash(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Plain resize to ``size``×``size``, distorting the aspect ratio: the seed's behaviour."""
    return image.resize((size, size), _resample(interpolation))


def resize_image(
    image: Image.Image,
    size: int,
    mode: str = "letterbox",
    interpolation: str = "bicubic",
    fill: Sequence[int] = IMAGENET_FILL,
) -> Image.Image:
    """``mode`` "letterbox" (default) or "squash" (to reproduce the seed); others raise."""
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
    """The seed's "domain normalisation", applied identically to consumer and shop images.

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

    The seed's ladder, applied after the letterbox (so crops are of the padded square):

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
    """(PIL image, box) → normalised float tensor [3, size, size]; built by :func:`build_transform`.

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
        image = crop_box(image, box if self.crop else None, self.margin)  # crop=False: the whole photo
        image = photometric(image, self.photometric)
        image = resize_image(image, self.img_size, self.resize, self.interpolation, self.fill)
        return self.tensor_ops(image)

    def __repr__(self) -> str:
        return (
            f"C2STransform(img_size={self.img_size}, interpolation={self.interpolation!r}, "
            f"augment={self.augment!r}, resize={self.resize!r}, photometric={self.photometric!r}, "
            f"margin={self.margin}, crop={self.crop})"
        )


def build_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    augment: str = "none",
    resize: str = "letterbox",
    photometric: str = "none",
    margin: float = 0.0,
    crop: bool = True,
) -> C2STransform:
    """crop(margin) → photometric → resize → augmentation → tensor/Normalize.

    ``mean``, ``std``, ``interpolation`` (a timm name) and ``img_size`` come from the model's
    data config (``timm.data.resolve_data_config``), so EfficientNet-B3 gets its 288/300 px,
    not the seed's 224. Letterbox padding uses the ``mean`` colour.
    """
    return C2STransform(img_size, mean, std, interpolation, augment, resize, photometric, margin, crop)


# --------------------------------------------------------------------------- dataset


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; a missing or broken file raises a one-line InputError."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:  # missing, unreadable, truncated
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise errors.at(path, None, f"cannot read image ({reason})") from None


class C2SDataset(Dataset):
    """One sample per row of an image table: ``(tensor, label, row_index)``.

    ``label`` is the item's position in the sorted list of the table's item ids
    (``item_to_label``), stable for a given table. ``row_index`` is the position in
    ``.table`` (reset to 0..n-1), the same index the sampler yields, so embeddings can be
    joined back to rows.
    """

    def __init__(self, table: pd.DataFrame, data_root: str | Path, transform: C2STransform):
        check_columns(table, IMAGE_COLUMNS)
        self.table = table.reset_index(drop=True)
        self.data_root = Path(data_root)
        self.transform = transform
        self.item_to_label = {item: label for label, item in enumerate(sorted(self.table["item_id"].unique()))}
        self.labels = self.table["item_id"].map(self.item_to_label).to_numpy(dtype=np.int64)
        self.domains = self.table["domain"].to_numpy(dtype=str)
        # Plain arrays: cheap to index in __getitem__ and to copy into workers.
        self._paths = self.table["path"].to_numpy(dtype=str)
        self._boxes = self.table[list(BOX_COLUMNS)].to_numpy(dtype=np.float64)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """``key`` = a row, or ``(row, draw_seed)`` from :class:`SampleSeeds`: the random
        augmentation of that sample is then drawn from ``draw_seed`` alone, so it is the same
        in any worker, for any number of workers, and after a resume."""
        i, draw_seed = key if isinstance(key, tuple) else (key, None)
        path = self.data_root / self._paths[i]
        image = open_rgb(path)
        try:
            if draw_seed is None:
                tensor = self.transform(image, self._boxes[i])
            else:
                # fork_rng restores torch's global generator afterwards (it matters in the main
                # process when num_workers is 0: model code must not see these draws).
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(draw_seed)
                    tensor = self.transform(image, self._boxes[i])
        except InputError as exc:  # a bad box: name the image it belongs to
            raise errors.at(path, None, str(exc)) from None
        return tensor, int(self.labels[i]), int(i)


# --------------------------------------------------------------------------- P×K sampler


class PKSampler(Sampler[list[int]]):
    """Batches of P items × K images, each item with ≥ 1 consumer and ≥ 1 shop image.

    Use as ``DataLoader(dataset, batch_sampler=PKSampler(...))``. ``source`` is the image
    table (``item_id`` and ``domain`` columns, rows in dataset order) or a ``(labels, domains)``
    pair, e.g. ``(dataset.labels, dataset.domains)``.

    * Eligible items have at least one consumer and one shop image; the others can form no
      cross-domain positive pair and are left out (``ineligible_items``, ``n_ineligible``).
    * Per item: one random consumer image, one random shop image, then K − 2 more of its other
      images without replacement. Only an item with fewer than K images repeats: all its
      images are used once and the rest drawn with replacement.
    * An epoch walks through random permutations of the eligible items, P at a time, so the
      items in a batch are distinct. Default length: ``n_eligible // P`` batches (each item at
      most once, the ``n_eligible % P`` left over differ per epoch). A longer ``epoch_len``
      starts a new permutation whenever fewer than P items remain in the current one.
    * The batches are a pure function of ``(seed, epoch)``: call ``set_epoch(e)`` before each
      epoch, as with ``DistributedSampler``; resuming at epoch e reproduces its batches.
    """

    def __init__(
        self,
        source: pd.DataFrame | tuple[Sequence, Sequence],
        p: int,
        k: int,
        epoch_len: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(source, pd.DataFrame):
            check_columns(source, ("item_id", "domain"))
            labels, domains = source["item_id"].to_numpy(), source["domain"].to_numpy(dtype=str)
        else:
            labels, domains = np.asarray(source[0]), np.asarray(source[1], dtype=str)
        unknown = sorted(set(np.unique(domains)) - set(DOMAINS))
        if unknown:
            raise InputError(f"unknown domain value(s) {', '.join(unknown)}; expected consumer or shop")
        if p < 1 or k < 2:
            raise InputError(f"P×K sampler needs P >= 1 and K >= 2 (one consumer + one shop), got P={p}, K={k}")
        if seed < 0:
            raise InputError(f"sampler seed must be >= 0, got {seed}")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self._group(labels, domains)
        if len(self.items) < p:
            raise InputError(
                f"P×K sampler needs >= {p} items with both a consumer and a shop image, "
                f"found {len(self.items)} ({self.n_ineligible} ineligible)"
            )
        if epoch_len is not None and epoch_len < 1:
            raise InputError(f"epoch_len must be >= 1, got {epoch_len}")
        self.epoch_len = epoch_len if epoch_len is not None else len(self.items) // p

    def _group(self, labels: np.ndarray, domains: np.ndarray) -> None:
        """Index rows by item: ``items`` (eligible, sorted) and their consumer / shop / all rows."""
        order = np.argsort(labels, kind="stable")
        item_ids, starts = np.unique(labels[order], return_index=True)
        self.items, self.ineligible_items = [], []
        self._consumer, self._shop, self._all = [], [], []
        for item, rows in zip(item_ids.tolist(), np.split(order, starts[1:])):
            consumer, shop = rows[domains[rows] == "consumer"], rows[domains[rows] == "shop"]
            if len(consumer) == 0 or len(shop) == 0:
                self.ineligible_items.append(item)
                continue
            self.items.append(item)
            self._consumer.append(consumer)
            self._shop.append(shop)
            self._all.append(rows)

    @property
    def n_ineligible(self) -> int:
        return len(self.ineligible_items)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.epoch_len

    def _draw(self, slot: int, rng: np.random.Generator) -> list[int]:
        """K row indices of the item ``self.items[slot]``: a consumer, a shop, then K − 2 others."""
        rows = self._all[slot]
        consumer, shop = rng.choice(self._consumer[slot]), rng.choice(self._shop[slot])
        others = rows[(rows != consumer) & (rows != shop)]
        need = self.k - 2
        if len(others) >= need:
            extra = rng.choice(others, need, replace=False)
        else:  # fewer than K images: use each once, then repeat at random
            extra = np.concatenate([others, rng.choice(rows, need - len(others))])
        return [int(consumer), int(shop), *(int(i) for i in extra)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        permutation, position = np.empty(0, dtype=np.int64), 0
        for _ in range(self.epoch_len):
            if len(permutation) - position < self.p:  # start a new pass: no item twice in a batch
                permutation, position = rng.permutation(len(self.items)), 0
            chosen = permutation[position : position + self.p]
            position += self.p
            yield [row for slot in chosen for row in self._draw(slot, rng)]


class SampleSeeds(Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler (e.g. :class:`PKSampler`): each row it yields comes with a seed of
    its own, a pure function of ``(seed, epoch, batch, position in the batch)``, from which
    :class:`C2SDataset` draws that sample's augmentation. Same seed → same augmented pixels
    for ``num_workers`` 0, 1 or 8 (torch's per-worker seeds no longer matter)."""

    def __init__(self, batch_sampler, seed: int):
        super().__init__()
        self.batch_sampler, self.seed = batch_sampler, seed

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.batch_sampler.epoch
        for b, batch in enumerate(self.batch_sampler):
            states = np.random.SeedSequence([self.seed, epoch, b]).generate_state(len(batch), dtype=np.uint64)
            yield [(int(row), int(state % 2**63)) for row, state in zip(batch, states)]


# --------------------------------------------------------------------------- loader


def make_loader(
    dataset: Dataset,
    batch_sampler: Sampler[list[int]] | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> DataLoader:
    """A seeded DataLoader: by ``batch_sampler`` (e.g. :class:`PKSampler`) or by
    ``batch_size``/``shuffle`` (evaluation: keep ``shuffle=False`` so rows stay in order).

    The seeded generator fixes the shuffle order and each worker's base seed, so a run is
    reproducible for a given ``num_workers``; ``worker_init_fn`` seeds NumPy/random in each
    worker. Workers decode JPEGs while the model computes and persist across epochs (no
    re-fork per epoch); memory is pinned only for CUDA, where it speeds host→device copies.
    """
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    # DataLoader refuses batch_size/shuffle next to a batch_sampler, so pass one or the other.
    if batch_sampler is not None:
        batching = {"batch_sampler": batch_sampler}
    else:
        batching = {"batch_size": batch_size, "shuffle": shuffle}
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        generator=torch_generator(seed),
        worker_init_fn=worker_init_fn,
        pin_memory=str(device).startswith("cuda"),
        persistent_workers=num_workers > 0,
    )
