"""Tests for helpers.data.transforms: geometry, photometric modes, augmentation presets, dataset,
P×K sampler and the seeded loader. Tiny images made here; runs in a few seconds."""

from __future__ import annotations

import colorsys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers.core.errors import InputError
from helpers.data import datasets, transforms

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # pixel 127.5 never occurs: exact 0 = erased


def solid(width: int, height: int, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def luma(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


# --------------------------------------------------------------------------- crop_box


def test_crop_box_margin_grows_each_side():
    image = solid(400, 300)
    assert transforms.crop_box(image, (100, 100, 200, 150), 0.0).size == (100, 50)
    assert transforms.crop_box(image, (100, 100, 200, 150), 0.1).size == (120, 60)
    assert transforms.crop_box(image, (100, 100, 200, 150), 0.2).size == (140, 70)


def test_crop_box_clips_at_image_edges():
    image = Image.new("RGB", (400, 300))
    image.paste((255, 0, 0), (0, 0, 5, 300))  # red column x < 5 marks the left edge
    # Box touching the left/top edges: the margin cannot go below 0.
    cropped = transforms.crop_box(image, (0, 0, 100, 50), 0.1)
    assert cropped.size == (110, 55)
    assert cropped.getpixel((0, 0)) == (255, 0, 0)
    # Box touching the right/bottom edges: clipped at 400×300.
    assert transforms.crop_box(image, (300, 250, 400, 300), 0.1).size == (110, 55)
    assert transforms.crop_box(image, None, 0.2).size == (400, 300)


def test_crop_box_rejects_empty_and_outside_boxes():
    image = solid(100, 100)
    with pytest.raises(InputError, match="empty"):
        transforms.crop_box(image, (50, 50, 50, 80), 0.0)
    with pytest.raises(InputError, match="outside"):
        transforms.crop_box(image, (150, 150, 180, 180), 0.0)
    with pytest.raises(InputError):
        transforms.crop_box(image, (10, 10, 20, 20), -0.1)


# --------------------------------------------------------------------------- resize


def test_letterbox_keeps_aspect_and_pads_with_fill():
    out = np.asarray(transforms.letterbox(solid(200, 100), 64, fill=(1, 2, 3)))
    assert out.shape == (64, 64, 3)
    # 200×100 → 64×32 content centred vertically: rows 16..47 red, the rest fill.
    assert (out[16:48] == (200, 30, 30)).all()
    assert (out[:16] == (1, 2, 3)).all() and (out[48:] == (1, 2, 3)).all()
    # Portrait: 50×100 → 32×64 content centred horizontally.
    tall = np.asarray(transforms.letterbox(solid(50, 100), 64))
    assert (tall[:, 16:48] == (200, 30, 30)).all()
    assert (tall[:, :16] == transforms.IMAGENET_FILL).all()


def _extent(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box of a boolean mask."""
    rows, cols = np.nonzero(mask)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_letterbox_keeps_square_squash_distorts_it():
    image = Image.new("RGB", (100, 50), (0, 0, 255))
    image.paste((0, 255, 0), (0, 0, 50, 50))  # a green 50×50 square on the left half
    green = lambda im: (np.asarray(im)[..., 1] > 128) & (np.asarray(im)[..., 2] < 128)
    boxed = transforms.resize_image(image, 64, "letterbox", "bilinear")
    squashed = transforms.resize_image(image, 64, "squash", "bilinear")
    assert boxed.size == squashed.size == (64, 64)
    h, w = _extent(green(boxed))
    assert abs(h - w) <= 1 and 31 <= w <= 33  # still a square, 32 px
    h, w = _extent(green(squashed))
    assert h == 64 and 31 <= w <= 33  # stretched to 64×32


def test_resize_image_unknown_mode_or_interpolation():
    with pytest.raises(InputError, match="resize mode"):
        transforms.resize_image(solid(10, 10), 8, "crop")
    with pytest.raises(InputError, match="interpolation"):
        transforms.resize_image(solid(10, 10), 8, "letterbox", "cubic-ish")


# --------------------------------------------------------------------------- photometric


def test_grayworld_equalises_channel_means():
    rng = np.random.default_rng(0)
    cast = np.clip(rng.normal(110, 20, (64, 64, 3)) * [1.3, 1.0, 0.7], 0, 255).astype(np.uint8)
    before = cast.reshape(-1, 3).mean(axis=0)
    assert before.max() - before.min() > 50  # a real colour cast
    after = np.asarray(transforms.photometric(Image.fromarray(cast), "grayworld")).reshape(-1, 3).mean(axis=0)
    assert after.max() - after.min() < 1.0
    assert abs(after.mean() - before.mean()) < 1.0  # overall brightness kept


def _low_contrast_with_patch() -> np.ndarray:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:] = np.linspace(110, 140, 64).astype(np.uint8)[None, :, None]  # a dull gray ramp
    rgb[20:40, 20:40] = (150, 110, 100)  # a brownish-red patch
    return rgb


def _patch_hue(rgb: np.ndarray) -> float:
    r, g, b = rgb[25:35, 25:35].reshape(-1, 3).mean(axis=0) / 255
    return colorsys.rgb_to_hsv(r, g, b)[0]


def test_clahe_raises_contrast_and_keeps_hue():
    rgb = _low_contrast_with_patch()
    out = np.asarray(transforms.photometric(Image.fromarray(rgb), "clahe"))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert luma(out).std() > 1.2 * luma(rgb).std()
    assert abs(_patch_hue(out) - _patch_hue(rgb)) < 0.01  # hue as a fraction of the colour wheel


def test_photometric_none_both_and_unknown():
    image = Image.fromarray(_low_contrast_with_patch())
    assert np.array_equal(np.asarray(transforms.photometric(image, "none")), np.asarray(image))
    both = np.asarray(transforms.photometric(image, "both"))
    expected = np.asarray(transforms.clahe(transforms.grayworld(image)))
    assert np.array_equal(both, expected)
    with pytest.raises(InputError, match="photometric mode"):
        transforms.photometric(image, "retinex")


# --------------------------------------------------------------------------- transforms


def _striped(width=48, height=40) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("preset", list(transforms.AUGMENT_PRESETS))
def test_every_preset_gives_the_right_shape(preset):
    transform = transforms.C2STransform(32, MEAN, STD, "bicubic", augment=preset, photometric="both", margin=0.1)
    out = transform(_striped(), (4, 4, 40, 30))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_none_preset_is_deterministic_and_normalised():
    transform = transforms.C2STransform(16, MEAN, STD, "bilinear")
    image = solid(30, 10, (255, 0, 0))
    first, second = transform(image, None), transform(image, None)
    assert torch.equal(first, second)
    # Red content → (1, -1, -1); letterbox padding has the mean colour → about 0.
    assert torch.allclose(first[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert first[:, 0, 0].abs().max() < 0.01


def _erased_fraction(preset: str, draws: int = 40) -> tuple[float, float]:
    """(fraction of draws with an erased patch, mean |difference| from the un-augmented output)."""
    image = _striped()
    plain = transforms.C2STransform(32, MEAN, STD, "bilinear")(image)
    transform = transforms.C2STransform(32, MEAN, STD, "bilinear", augment=preset)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(draws)]
    erased = np.mean([bool((out == 0).all(dim=0).any()) for out in outputs])
    change = float(np.mean([(out - plain).abs().mean() for out in outputs]))
    return erased, change


def test_presets_increase_in_strength():
    results = {name: _erased_fraction(name) for name in ("none", "weak", "medium", "strong", "super_strong")}
    erased = {name: r[0] for name, r in results.items()}
    change = {name: r[1] for name, r in results.items()}
    assert erased["none"] == erased["weak"] == 0.0
    assert 0.2 <= erased["super_strong"] <= 0.6  # p = 0.4
    assert erased["medium"] < erased["super_strong"]
    assert change["none"] == 0.0
    assert change["weak"] < change["medium"] < change["strong"] < change["super_strong"]


def test_build_transform_rejects_unknown_names():
    with pytest.raises(InputError, match="augmentation preset"):
        transforms.C2STransform(32, MEAN, STD, augment="extreme")
    with pytest.raises(InputError, match="interpolation"):
        transforms.C2STransform(32, MEAN, STD, interpolation="random")
    with pytest.raises(InputError, match="resize mode"):
        transforms.C2STransform(32, MEAN, STD, resize="pad")


def test_transform_pickles_for_workers():
    import pickle

    transform = transforms.C2STransform(16, MEAN, STD, augment="strong", photometric="clahe")
    assert "strong" in repr(pickle.loads(pickle.dumps(transform)))


# --------------------------------------------------------------------------- dataset


def make_tree(root, counts: dict[str, tuple[int, int]], size=(24, 20)) -> pd.DataFrame:
    """Write tiny images for items {item_id: (n_consumer, n_shop)}; return the image table."""
    rows = []
    for n, (item, (n_consumer, n_shop)) in enumerate(sorted(counts.items())):
        for domain, count in (("consumer", n_consumer), ("shop", n_shop)):
            for j in range(count):
                rel = f"img/{item}/{domain}_{j}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                colour = (20 * n % 256, 40 * j % 256, 100 if domain == "shop" else 200)
                solid(*size, colour).save(root / rel)
                rows.append(
                    dict(
                        path=rel,
                        item_id=item,
                        domain=domain,
                        split="train",
                        category="TOPS",
                        subcategory="tee",
                        clothes_type=1,
                        x_1=2,
                        y_1=2,
                        x_2=22,
                        y_2=18,
                    )
                )
    return pd.DataFrame(rows)


def test_dataset_returns_tensor_label_index(tmp_path):
    table = make_tree(tmp_path, {"id_b": (1, 1), "id_a": (2, 1)})
    dataset = datasets.C2SDataset(table, tmp_path, transforms.C2STransform(16, MEAN, STD))
    assert len(dataset) == 5
    assert dataset.item_to_label == {"id_a": 0, "id_b": 1}
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1]
    assert dataset.domains.tolist() == ["consumer", "consumer", "shop", "consumer", "shop"]
    tensor, label, index = dataset[3]
    assert tensor.shape == (3, 16, 16) and label == 1 and index == 3


def test_dataset_missing_or_broken_image_names_the_path(tmp_path):
    table = make_tree(tmp_path, {"id_a": (1, 1)})
    (tmp_path / table.path[0]).unlink()
    (tmp_path / table.path[1]).write_bytes(b"not a jpeg")
    dataset = datasets.C2SDataset(table, tmp_path, transforms.C2STransform(16, MEAN, STD))
    for i in (0, 1):
        with pytest.raises(InputError) as info:
            dataset[i]
        message = str(info.value)
        assert str(tmp_path / table.path[i]) in message and "\n" not in message


def test_dataset_bad_box_and_missing_column(tmp_path):
    table = make_tree(tmp_path, {"id_a": (1, 1)})
    table.loc[0, ["x_1", "x_2"]] = [10, 5]
    dataset = datasets.C2SDataset(table, tmp_path, transforms.C2STransform(16, MEAN, STD))
    with pytest.raises(InputError, match="empty") as info:
        dataset[0]
    assert str(tmp_path / table.path[0]) in str(info.value)
    with pytest.raises(InputError, match="x_1"):
        datasets.C2SDataset(table.drop(columns="x_1"), tmp_path, dataset.transform)


# --------------------------------------------------------------------------- P×K sampler


def sampler_table() -> pd.DataFrame:
    """6 eligible items of various sizes, one consumer-only and one shop-only item."""
    counts = {
        "a": (1, 1),
        "b": (3, 2),
        "c": (2, 1),
        "d": (5, 4),
        "e": (1, 3),
        "f": (2, 2),
        "g_consumer_only": (3, 0),
        "h_shop_only": (0, 2),
    }
    rows = [(item, domain) for item, (c, s) in counts.items() for domain in ["consumer"] * c + ["shop"] * s]
    rng = np.random.default_rng(3)
    rows = [rows[i] for i in rng.permutation(len(rows))]  # rows of an item need not be adjacent
    return pd.DataFrame(rows, columns=["item_id", "domain"])


def check_batch(batch, table, p, k):
    items = table.item_id.to_numpy()[batch]
    domains = table.domain.to_numpy()[batch]
    assert len(batch) == p * k
    assert Counter(items) == {item: k for item in set(items)} and len(set(items)) == p
    for start in range(0, p * k, k):  # the K rows of an item are adjacent
        assert len(set(items[start : start + k])) == 1
        assert {"consumer", "shop"} <= set(domains[start : start + k])


def test_pk_sampler_batches_are_p_items_by_k_cross_domain():
    table = sampler_table()
    sampler = datasets.PKSampler(table, p=3, k=4, seed=7)
    assert sampler.items == ["a", "b", "c", "d", "e", "f"]
    assert sampler.ineligible_items == ["g_consumer_only", "h_shop_only"] and sampler.n_ineligible == 2
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2  # 6 eligible items // P
    for batch in batches:
        check_batch(batch, table, 3, 4)
        assert all(isinstance(i, int) for i in batch)
    # With the default length each item appears at most once per epoch.
    seen = [table.item_id[b[0]] for batch in batches for b in [batch[i : i + 4] for i in range(0, 12, 4)]]
    assert len(seen) == len(set(seen)) == 6


def test_pk_sampler_replacement_only_for_small_items():
    table = sampler_table()
    for epoch in range(5):
        sampler = datasets.PKSampler(table, p=2, k=4, epoch_len=12, seed=epoch)
        for batch in sampler:
            for start in range(0, 8, 4):
                rows = batch[start : start + 4]
                n_images = (table.item_id == table.item_id[rows[0]]).sum()
                if n_images >= 4:
                    assert len(set(rows)) == 4  # no repeats when the item has K images
                else:
                    assert len(set(rows)) == n_images  # every image used, the rest repeats


def test_pk_sampler_is_a_function_of_seed_and_epoch():
    table = sampler_table()
    sampler = datasets.PKSampler(table, p=2, k=3, seed=1)
    epoch0, epoch0_again = list(sampler), list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 == epoch0_again and epoch0 != epoch1
    resumed = datasets.PKSampler(table, p=2, k=3, seed=1)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1  # resuming at epoch 1 reproduces it exactly
    assert list(datasets.PKSampler(table, p=2, k=3, seed=2)) != epoch0


def test_pk_sampler_from_labels_and_domains_and_epoch_len():
    table = sampler_table()
    sampler = datasets.PKSampler((table.item_id.to_numpy(), table.domain.to_numpy()), p=4, k=2, epoch_len=5)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 5
    for batch in batches:
        check_batch(batch, table, 4, 2)


def test_pk_sampler_errors():
    table = sampler_table()
    with pytest.raises(InputError, match="found 6"):
        datasets.PKSampler(table, p=7, k=2)
    with pytest.raises(InputError, match="K >= 2"):
        datasets.PKSampler(table, p=2, k=1)
    with pytest.raises(InputError, match="domain"):
        datasets.PKSampler((["a", "a"], ["consumer", "store"]), p=1, k=2)
    with pytest.raises(InputError, match="epoch_len"):
        datasets.PKSampler(table, p=2, k=2, epoch_len=0)


# --------------------------------------------------------------------------- loader


def _batches(loader, epochs=2):
    out = []
    for epoch in range(epochs):
        if isinstance(loader.batch_sampler, datasets.PKSampler):
            loader.batch_sampler.set_epoch(epoch)
        out.extend((images.clone(), labels.tolist(), index.tolist()) for images, labels, index in loader)
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and x[1] == y[1] and x[2] == y[2] for x, y in zip(a, b))


def test_make_loader_same_batches_with_and_without_workers(tmp_path):
    table = make_tree(tmp_path, {"a": (2, 1), "b": (1, 2), "c": (2, 2), "d": (1, 1)}, size=(12, 10))
    dataset = datasets.C2SDataset(table, tmp_path, transforms.C2STransform(8, MEAN, STD))

    def pk_loader(workers):
        sampler = datasets.PKSampler((dataset.labels, dataset.domains), p=2, k=3, seed=5)
        return datasets.make_loader(dataset, batch_sampler=sampler, num_workers=workers, seed=5)

    serial, parallel = _batches(pk_loader(0)), _batches(pk_loader(2))
    assert len(serial) == 4 and _same(serial, parallel)
    images, labels, index = serial[0]
    assert images.shape == (6, 3, 8, 8) and dataset.labels[index].tolist() == labels

    shuffled = [
        _batches(datasets.make_loader(dataset, batch_size=4, shuffle=True, num_workers=w, seed=9), 1) for w in (0, 2)
    ]
    assert _same(*shuffled)
    assert sorted(i for batch in shuffled[0] for i in batch[2]) == list(range(len(dataset)))


def test_make_loader_options(tmp_path):
    table = make_tree(tmp_path, {"a": (1, 1)})
    dataset = datasets.C2SDataset(table, tmp_path, transforms.C2STransform(8, MEAN, STD))
    loader = datasets.make_loader(dataset, batch_size=2, num_workers=1, device="cuda")
    assert loader.pin_memory and loader.persistent_workers and loader.worker_init_fn is not None
    loader = datasets.make_loader(dataset, batch_size=2)
    assert not loader.pin_memory and not loader.persistent_workers
    assert [index.tolist() for _, _, index in loader] == [[0, 1]]  # evaluation order kept
