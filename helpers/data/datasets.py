"""Table rows in, batches out: the dataset over ``images.csv``, a domain-aware P×K batch
sampler and a seeded ``DataLoader``.

:class:`C2SDataset` feeds one table row at a time through a
:class:`~helpers.data.transforms.C2STransform`; :class:`PKSampler` groups rows into batches of
P items × K images so that every item in a batch brings both a consumer and a shop photo;
:class:`SampleSeeds` gives every sample its own augmentation seed; :func:`make_loader` wraps it
all in a seeded ``DataLoader``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from helpers.core import errors
from helpers.core.errors import InputError
from helpers.core.repro import torch_generator, worker_init_fn
from helpers.core.schema import BOX_COLUMNS, DOMAINS, IMAGE_COLUMNS, check_columns
from helpers.data.store import CropStore
from helpers.data.transforms import C2STransform, open_rgb


class C2SDataset(Dataset):
    """One sample per row of an image table: ``(tensor, label, row_index)``.

    ``label`` is the item's position in the sorted list of the table's item ids
    (``item_to_label``), stable for a given table. ``row_index`` is the position in
    ``.table`` (reset to 0..n-1), the same index the sampler yields, so embeddings can be
    joined back to rows.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        data_root: str | Path,
        transform: C2STransform,
        store: CropStore | None = None,
        store_rows: np.ndarray | None = None,
    ):
        """With a ``store``, row ``i`` is read from ``store.pixels[store_rows[i]]`` (default: the
        same position) instead of being decoded, cropped and resized again."""
        check_columns(table, IMAGE_COLUMNS)
        self.store = store
        self._store_rows = np.arange(len(table)) if store_rows is None else np.asarray(store_rows)
        if store is not None and len(self._store_rows) != len(table):
            raise InputError(f"{len(table)} table rows but {len(self._store_rows)} store rows")
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
        if self.store is not None:  # prepare()'s output, stored: only the random part is left to do
            prepared = np.array(self.store.pixels[self._store_rows[i]])  # a copy: the store stays read-only
        else:
            image = open_rgb(path)
            try:
                prepared = self.transform.prepare(image, self._boxes[i])
            except InputError as exc:  # a bad box: name the image it belongs to
                raise errors.at(path, None, str(exc)) from None
        if draw_seed is None:
            return self.transform.finish(prepared), int(self.labels[i]), int(i)
        # fork_rng restores torch's global generator afterwards (it matters in the main process
        # when num_workers is 0: model code must not see these draws).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed)
            return self.transform.finish(prepared), int(self.labels[i]), int(i)


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
