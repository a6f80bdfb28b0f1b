"""The Python API of retrieval: a photo in, the top-k shop images of a gallery index out.

::

    from helpers.evaluation.retriever import Retriever

    retriever = Retriever.load("outputs/demo/final_index")  # runtime="onnx": onnxruntime, no torch model
    hits = retriever.search("street_photo.jpg", box=(40, 30, 200, 260), k=5)

The CLI's ``search`` and the live demo (:mod:`helpers.apps.app`) search through it, so the three
give one answer for one photo.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from helpers.core.errors import InputError
from helpers.data import transforms
from helpers.evaluation.gallery import GalleryIndex


class Retriever:
    """Searches one gallery index (:class:`helpers.evaluation.gallery.GalleryIndex`) with one photo
    at a time, ranked as the index ranks (its post-processing included)."""

    def __init__(self, index: GalleryIndex):
        self.index = index

    @classmethod
    def load(cls, index_dir: str | Path, runtime: str = "torch", model: str | Path | None = None) -> Retriever:
        """The index written by ``python -m helpers index``; queries embedded by ``runtime``:
        ``torch`` (the index's ``model.pt``) or ``onnx`` (onnxruntime: the index's ``model.onnx``, or
        ``model``, an export of the same checkpoint by ``python -m helpers export``)."""
        return cls(GalleryIndex.load(index_dir, runtime=runtime, onnx_model=model))

    @property
    def runtime(self) -> str:
        return self.index.runtime

    @property
    def gallery(self) -> pd.DataFrame:
        """One row per gallery image (``path``, ``item_id``, ``category``, ...), in index order."""
        return self.index.gallery

    def search(self, image, box=None, k: int = 5, true_item: str | None = None) -> list[dict]:
        """The top-``k`` gallery images for one photo, best first: dicts with ``rank``, ``score``
        (cosine similarity unless the index re-ranks), ``item_id``, ``path`` (relative to the data
        root) and ``category``; with ``true_item`` (the photo's item, when known) also ``match``.

        ``image``: a file path or bytes (decoded upright, as a viewer shows it:
        :func:`helpers.data.transforms.open_photo`) or a PIL image (used as it is). ``box``:
        ``(x1, y1, x2, y2)`` of the garment in those pixels; None searches the whole photo.
        """
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a whole number >= 1, got {k!r}")
        picture = transforms.open_photo(image) if isinstance(image, (str, Path, bytes)) else image
        hits = self.index.search_image(picture, box=box, k=k)
        if true_item is not None:
            for hit in hits:
                hit["match"] = hit["item_id"] == true_item
        return hits
