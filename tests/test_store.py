"""helpers.data.store: each training and val image decoded once per preprocessing. The stored path
gives today's tensors exactly (with and without augmentation, for any worker count, and as val
embeddings), a store of another table or preprocessing is never reused, and an interrupted build
is rebuilt, never read. Checked on a tree written by tests/independent_tree.py, not by
helpers.data.synthetic."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from independent_tree import build as build_independent_tree

from helpers.core import config
from helpers.core.errors import InputError
from helpers.core.schema import read_table
from helpers.data import datasets, sampling, store, transforms
from helpers.data.transforms import C2STransform, open_rgb
from helpers.evaluation import inference

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    root = base / "c2s"
    build_independent_tree(root, n_items=6, seed=5)
    sampling.prepare(root, base / "prepared", categories=None, sample=None, progress=False)
    table = read_table(base / "prepared" / "images.csv")
    return root, table[table.split == "train"].reset_index(drop=True)


def transform(augment: str = "none", **fields) -> C2STransform:
    return C2STransform(48, MEAN, STD, "bicubic", augment=augment, **fields)


def test_without_augmentation_the_stored_path_gives_todays_tensors(tree, tmp_path):
    root, rows = tree
    t = transform(margin=0.1, photometric="grayworld")
    crops = store.ensure_store(rows, root, t, tmp_path, progress=False)
    assert crops.valid.all() and crops.pixels.shape == (len(rows), 48, 48, 3) and crops.pixels.dtype == np.uint8
    for i, row in enumerate(rows.itertuples(index=False)):
        today = t(open_rgb(root / row.path), (row.x_1, row.y_1, row.x_2, row.y_2))
        assert torch.equal(t.finish(crops.pixels[i]), today)


@pytest.mark.parametrize("augment", ["flip", "strong"])
def test_with_augmentation_per_sample_seeds_give_the_same_pixels(tree, tmp_path, augment):
    root, rows = tree
    t = transform(augment)
    crops = store.ensure_store(rows, root, t, tmp_path, progress=False)
    decoded, stored = datasets.C2SDataset(rows, root, t), datasets.C2SDataset(rows, root, t, store=crops)
    for key in [(i, 1000 + 7 * i) for i in range(len(rows))]:
        assert torch.equal(decoded[key][0], stored[key][0])
    # The draws really are random: seeds of one row differ (so the equality above can fail).
    assert len({stored[(0, seed)][0].numpy().tobytes() for seed in range(8)}) > 1


def test_the_stored_loader_is_the_same_for_any_worker_count(tree, tmp_path):
    root, rows = tree
    t = transform("strong")
    dataset = datasets.C2SDataset(rows, root, t, store=store.ensure_store(rows, root, t, tmp_path, progress=False))

    def batches(workers: int) -> list:
        sampler = datasets.SampleSeeds(datasets.PKSampler((dataset.labels, dataset.domains), 2, 2, seed=3), seed=3)
        loader = datasets.make_loader(dataset, batch_sampler=sampler, num_workers=workers, seed=100 + workers)
        return [(x, y) for x, y, _ in loader]

    zero, two = batches(0), batches(2)
    assert len(zero) == len(two) > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(zero, two))


def test_embedding_from_the_store_gives_the_decoded_embeddings(tree, tmp_path):
    """Val is embedded from its store: the same batches, hence the same embeddings, as decoding."""
    root, rows = tree
    cfg = config.get_config("fixture", box_margin=0.1, photometric="clahe")
    data_config = {"input_size": [3, 48, 48], "mean": MEAN, "std": STD, "interpolation": "bicubic"}
    crops = store.ensure_store(rows, root, transforms.create_transform(cfg, data_config), tmp_path, progress=False)
    decoded = inference.TableEmbedder(cfg, data_config, rows, root, "cpu", cache=False)
    stored = inference.TableEmbedder(cfg, data_config, rows, root, "cpu", cache=False, crops=crops)
    pairs = list(zip(decoded.loader, stored.loader))
    assert len(pairs) == len(decoded.loader) > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in pairs)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert np.array_equal(decoded(model, progress=False), stored(model, progress=False))
    # A store of other rows, or with an image it could not read, is refused.
    with pytest.raises(InputError, match="a crop store of other rows"):
        inference.TableEmbedder(cfg, data_config, rows.iloc[1:], root, "cpu", crops=crops)
    unreadable = store.CropStore(crops.path, {**crops.meta, "valid": [0] + crops.meta["valid"][1:]}, True)
    with pytest.raises(InputError, match="1 image\\(s\\) to embed could not be read"):
        inference.TableEmbedder(cfg, data_config, rows, root, "cpu", crops=unreadable)


def test_another_table_or_preprocessing_is_another_store(tree, tmp_path):
    root, rows = tree
    key = store.store_key(rows, root, transform())
    assert store.store_key(rows.iloc[::-1], root, transform()) != key  # the same rows, another order
    assert store.store_key(rows, root, transform(margin=0.2)) != key
    assert store.store_key(rows, root, transform(resize="squash")) != key
    assert store.store_key(rows, tmp_path, transform()) != key  # another data root
    # Augmentation is not stored: one store serves every preset of a preprocessing.
    assert store.store_key(rows, root, transform("super_strong")) == key


def test_a_store_is_reused_only_when_complete_and_of_its_key(tree, tmp_path):
    root, rows = tree
    t = transform()
    first = store.ensure_store(rows, root, t, tmp_path, progress=False)
    expected = np.array(first.pixels)
    npy, meta_path = tmp_path / f"{first.key}.npy", tmp_path / f"{first.key}.json"
    built = npy.stat().st_mtime_ns
    assert store.ensure_store(rows, root, t, tmp_path, progress=False).meta == first.meta
    assert npy.stat().st_mtime_ns == built  # reused, not rebuilt

    # A record of another shape (or key) is not this store's: rebuilt.
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "shape": [1, 48, 48, 3]}))
    np.save(npy, np.zeros_like(expected))
    rebuilt = store.ensure_store(rows, root, t, tmp_path, progress=False)
    assert np.array_equal(rebuilt.pixels, expected)

    # An interrupted build: the array is there (or half there) but its record is not: rebuilt.
    meta_path.unlink()
    np.save(npy, np.zeros_like(expected))
    (tmp_path / f"{first.key}.npy.partial123").write_bytes(b"half")
    again = store.ensure_store(rows, root, t, tmp_path, progress=False)
    assert np.array_equal(again.pixels, expected) and meta_path.is_file()


def test_an_undecodable_image_is_excluded_and_listed(tree, tmp_path, capsys):
    root, rows = tree
    bad_root = tmp_path / "copy"
    for path in rows.path:
        target = bad_root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((root / path).read_bytes())
    broken = rows.path.iloc[2]
    (bad_root / broken).write_bytes((bad_root / broken).read_bytes()[:100])  # truncated JPEG
    crops = store.ensure_store(rows, bad_root, transform(), tmp_path / "stores", progress=False)
    assert crops.valid.tolist() == [i != 2 for i in range(len(rows))]
    assert crops.meta["n_excluded"] == 1
    listing = (tmp_path / "stores" / f"{crops.key}_bad_images.txt").read_text()
    assert listing.startswith(broken + "\t") and "cannot read image" in listing
    assert "1 image(s) could not be read and are excluded" in capsys.readouterr().err


def test_a_large_store_is_memory_mapped_with_the_same_pixels(tree, tmp_path, monkeypatch):
    root, rows = tree
    t = transform()
    in_memory = store.ensure_store(rows, root, t, tmp_path, progress=False)
    mapped = store.ensure_store(rows, root, t, tmp_path, budget_bytes=0, progress=False)
    assert in_memory.in_memory and not mapped.in_memory
    assert isinstance(mapped.pixels, np.memmap) and np.array_equal(mapped.pixels, in_memory.pixels)
    # A worker gets the path, not the images; it opens its own copy.
    clone = pickle.loads(pickle.dumps(mapped))
    assert clone._pixels is None and np.array_equal(clone.pixels, in_memory.pixels)
    monkeypatch.setenv("C2S_STORE_MB", "none")
    with pytest.raises(InputError, match="C2S_STORE_MB"):
        store.resolve_store_bytes()


def test_fit_trains_from_the_store_beside_the_prepared_table(small_tree, tmp_path):
    """A run builds its stores (train, val) once beside images.csv; a second run of the same
    preprocessing (another seed) reuses them."""
    from helpers.training import train

    root, table_path = small_tree
    work = tmp_path / "prepared"
    work.mkdir()
    (work / "images.csv").write_bytes(table_path.read_bytes())
    cfg = config.get_config("fixture", epochs=1)
    train.fit(cfg, work / "images.csv", root, tmp_path / "run0", progress=False)
    stores = sorted((work / "stores").glob("*.json"))
    assert len(stores) == 2
    built = [path.stat().st_mtime_ns for path in stores]
    train.fit(
        config.get_config("fixture", epochs=1, seed=1), work / "images.csv", root, tmp_path / "run1", progress=False
    )
    assert sorted((work / "stores").glob("*.json")) == stores
    assert [path.stat().st_mtime_ns for path in stores] == built
