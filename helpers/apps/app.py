"""The live demo: a Gradio app over a saved gallery index (``python -m helpers serve``).

A consumer photo goes in (upload, webcam, clipboard, or one of the index's test queries), with
a box dragged around the garment on the photo (a test query comes with its annotated box; no box:
the whole photo); the top-K shop images come out with item id, category and score, and for a test
query whether its true item was found (an upload's true item is unknown: its table says so).

The box is drawn with ``gradio_image_annotation`` (its ``image_annotator``, one box at most): its
value holds the box in the shown image's pixels, which is what the search crops to, and it takes a
box to show, so a test query's annotated box is drawn on it. Gradio's own ImageEditor was the
alternative, but its crop tool gives back a cropped picture, never the box, and cannot be given one.

Two layers, so the logic is tested without a browser or a server:

* :class:`SearchApp` holds the loaded index and answers a query with plain values
  (:meth:`SearchApp.answer`: bytes / path / PIL in, an :class:`Answer` out). Bad input never
  raises out of it: every problem becomes a one-line message in the answer.
* :func:`build_blocks` wires those handlers into Gradio Blocks; :func:`serve` launches
  them with a queue of concurrency 1, so queries run one after another: on a 2-core CPU,
  parallel queries would only oversubscribe the cores (torch already uses both per query).

The gallery is embedded once, when the index is built (``python -m helpers index``); a query
embeds only its own photo, with PyTorch or onnxruntime (``serve --runtime``). The app searches
through :class:`helpers.evaluation.retriever.Retriever` (``load``, ``search``, ``.gallery``), the
CLI's ``search`` too, so the two give one answer and the app does not depend on how retrieval is
implemented.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.data import transforms

log = logging.getLogger(__name__)

# An upload larger than this is refused before it is read: no photo of a garment needs more,
# and Gradio's own upload limit (serve's max_file_size) stops bigger ones even earlier.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Refused before decoding: a "decompression bomb" is a small file declaring a huge canvas
# (a 20000×20000 PNG of one colour is a few hundred kB but 1.2 GB decoded). 64 MP is above
# any phone camera's default resolution.
MAX_PIXELS = 64_000_000
# Smaller than this holds no garment worth searching for (and a 1×1 image is usually a
# tracking pixel or a broken export, not a photo).
MIN_SIDE = 16
MAX_K = 50
# The dropdown of test queries is for picking an example, not for browsing a whole split.
MAX_LISTED_QUERIES = 300
# One torch thread per query. Measured on the 2-core CPU with other processes running (load
# average ~5): the demo model's query took 52-105 ms with 1 thread and 300-880 ms with 2, whose
# threads wait for each other whenever one is descheduled; one 128-px image gains little from
# a second thread anyway, and the other core is left to Gradio's upload and encoding work.
QUERY_THREADS = 1
# The study's experiment that searches with the whole photo instead of the garment box: the page
# quotes its result (results/<profile>/crop/) to say why the box matters.
CROP_EXPERIMENT = "crop"
BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")  # a drawn box, in the box-drawing component's value
# The box-drawing component's quarter turns (clockwise, as its rotate buttons turn the photo).
QUARTER_TURNS = {0: None, 1: Image.Transpose.ROTATE_270, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_90}


class QueryError(InputError):
    """A query the app cannot answer; the message is shown to the user as it is."""


# ----------------------------------------------------------------------------------------
# Decoding an upload
# ----------------------------------------------------------------------------------------


def read_upload(source) -> bytes:
    """The bytes of an upload: ``bytes`` as they are, a path read (size-checked first)."""
    if source is None:
        raise QueryError("no image: upload a photo, take one with the webcam or pick a test query")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise QueryError(f"the uploaded file {path.name!r} is missing on the server; upload it again")
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise QueryError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload a smaller photo")
        data = path.read_bytes()
    if not data:
        raise QueryError("the file is empty (0 bytes); upload a photo")
    if len(data) > MAX_UPLOAD_BYTES:
        raise QueryError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload a smaller photo")
    return data


def decode_image(data: bytes | Image.Image) -> Image.Image:
    """An upload as the upright RGB photo a viewer shows, within this demo's limits (a bomb or a
    1×1 image is refused before its pixels are decoded), or an :class:`InputError` saying why.

    :func:`helpers.data.transforms.open_photo` decodes it: the decoder of the CLI's ``search``
    too, so a photo gets the same answer from both (EXIF orientation included).
    """
    return transforms.open_photo(data, max_pixels=MAX_PIXELS, min_side=MIN_SIDE)


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return (text[:120] + "…") if len(text) > 120 else (text or type(error).__name__)


def parse_box(box, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The garment box as ``(x1, y1, x2, y2)`` pixels, or None for the whole photo.

    ``box`` is None / "" / a text ``"x1,y1,x2,y2"`` / a 4-sequence / a box the user drew: a dict of
    the box-drawing component's value (``xmin, ymin, xmax, ymax`` over its optional ``scaleFactor``,
    the component's own conversion from screen to image pixels). A box partly outside the image is
    clipped to it (as the training crops are); one entirely outside, empty or malformed is a
    :class:`QueryError`.
    """
    if box is None or (isinstance(box, str) and not box.strip()):
        return None
    name = "the drawn box" if isinstance(box, dict) else f"crop box {box!r}"
    malformed = QueryError(f"{name}: expected four numbers x1,y1,x2,y2 (pixels)")
    try:
        if isinstance(box, dict):
            scale = float(box.get("scaleFactor", 1))
            values = [float(box[key]) / scale for key in BOX_KEYS]
        elif isinstance(box, str):
            values = [float(p) for p in box.replace(";", ",").replace(" ", ",").split(",") if p]
        else:
            values = [float(v) for v in box]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise malformed from None
    if len(values) != 4 or not all(np.isfinite(values)):
        raise malformed
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise QueryError(f"{name} is empty: need x1 < x2 and y1 < y2")
    width, height = size
    left, top = max(0, round(x1)), max(0, round(y1))
    right, bottom = min(width, round(x2)), min(height, round(y2))
    if right - left < 1 or bottom - top < 1:
        raise QueryError(f"{name} lies outside the {width}×{height} image")
    return left, top, right, bottom


def turn(picture: Image.Image, turns) -> Image.Image:
    """``picture`` as the box-drawing component shows it after ``turns`` clicks on its rotate
    buttons (quarter turns clockwise, 0-3): the box the user drew is in those pixels."""
    if turns is None:
        return picture
    try:
        turns = int(turns)
    except (TypeError, ValueError):
        raise QueryError(f"the photo's rotation must be 0-3 quarter turns, got {turns!r}") from None
    if turns not in QUARTER_TURNS:
        raise QueryError(f"the photo's rotation must be 0-3 quarter turns, got {turns!r}")
    return picture if QUARTER_TURNS[turns] is None else picture.transpose(QUARTER_TURNS[turns])


# ----------------------------------------------------------------------------------------
# Answering a query
# ----------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What the UI shows for one query. ``ok`` False: ``message`` says what was wrong."""

    ok: bool
    message: str
    hits: list[dict] = field(default_factory=list)  # Retriever.search's dicts + "image" (absolute path)
    true_item: str | None = None
    seconds: float = 0.0
    box: tuple[int, int, int, int] | None = None  # the pixels searched (left, top, right, bottom); None: all

    def gallery(self) -> list[tuple[str, str]]:
        """(image path, caption) pairs for ``gr.Gallery``."""
        return [(hit["image"], caption(hit)) for hit in self.hits]


def caption(hit: dict) -> str:
    mark = " ✓ true item" if hit.get("match") else ""
    return f"#{hit['rank']} {hit['item_id']} · {hit['category']} · {hit['score']:.3f}{mark}"


def query_label(row) -> str:
    return f"{row.item_id} · {row.category} · {Path(row.path).name}"


class SearchApp:
    """A loaded gallery index (a :class:`~helpers.evaluation.retriever.Retriever`) plus the test
    queries it can offer; answers one query at a time."""

    def __init__(
        self,
        retriever,
        data_root: str | Path,
        queries: pd.DataFrame | None = None,
        synthetic: bool = False,
        results: str | Path | None = None,
    ):
        self.retriever = retriever
        self.synthetic = synthetic
        self.data_root = Path(data_root)
        self.results = None if results is None else Path(results)  # the study's results for the index's profile
        self.queries = {} if queries is None else {query_label(r): r for r in queries.itertuples(index=False)}

    @property
    def n_gallery(self) -> int:
        return len(self.retriever.gallery)

    def query_choices(self) -> list[str]:
        return list(self.queries)

    def query_example(self, label: str | None) -> tuple[str | None, str]:
        """The test query's image path and its annotated box as text (to fill the form)."""
        if not label or label not in self.queries:
            return None, ""
        row = self.queries[label]
        return str(self.data_root / row.path), f"{row.x_1},{row.y_1},{row.x_2},{row.y_2}"

    def query_annotation(self, label: str) -> dict:
        """The box-drawing component's value for a test query: the pixels the search reads (the
        stored ones, see :meth:`_picture`) with the query's annotated box drawn on them."""
        picture, _ = self._picture(None, label)
        row = self.queries[label]
        box = parse_box((row.x_1, row.y_1, row.x_2, row.y_2), picture.size)
        return {"image": picture, "boxes": [dict(zip(BOX_KEYS, box))]}

    def answer(self, image=None, query: str | None = None, box=None, k: int = 5, turns: int | None = None) -> Answer:
        """Top-``k`` for one photo; never raises for bad input (it becomes ``Answer.message``).

        ``image`` is bytes, a file path or a PIL image; ``query`` a label from
        :meth:`query_choices` (then its own file is searched and each hit's ``match`` says whether
        it is the query's true item; an upload's hits have no ``match``: its item is unknown);
        ``box`` the crop (:func:`parse_box`), in the pixels of the photo turned by ``turns``
        (:func:`turn`: the page's rotate buttons).
        """
        start = time.perf_counter()
        try:
            picture, true_item = self._picture(image, query)
            picture = turn(picture, turns)
            crop = parse_box(box, picture.size)
            hits = self._search(picture, crop, _check_k(k), true_item)
        except InputError as error:  # QueryError, and the index's own one-line errors (bad crop...)
            return Answer(False, f"⚠️ {error}", seconds=time.perf_counter() - start)
        except Exception as error:  # a bug must not take the server down; the log has the traceback
            log.exception("query failed")
            return Answer(
                False,
                f"⚠️ the search failed unexpectedly ({type(error).__name__}: {_reason(error)})",
                seconds=time.perf_counter() - start,
            )
        seconds = time.perf_counter() - start
        return Answer(True, _summary(hits, true_item, crop, seconds), hits, true_item, seconds, crop)

    def _picture(self, image, query: str | None) -> tuple[Image.Image, str | None]:
        if query:
            if query not in self.queries:
                raise QueryError(f"unknown test query {query!r}")
            row = self.queries[query]
            try:
                # A dataset image, read as the evaluation reads it: its box refers to the stored
                # pixels, so no EXIF turn (transforms.open_photo is for users' photos).
                return transforms.open_rgb(self.data_root / row.path), row.item_id
            except InputError as error:
                log.warning("test query unreadable: %s", error)  # the full path for the log only
                raise QueryError(f"the test query's image {row.path} cannot be read on the server") from None
        if isinstance(image, Image.Image):
            return decode_image(image), None
        return decode_image(read_upload(image)), None

    def _search(self, picture: Image.Image, box, k: int, true_item: str | None) -> list[dict]:
        hits = self.retriever.search(picture, box=box, k=k, true_item=true_item)
        for hit in hits:
            hit["image"] = str(self.data_root / hit["path"])
        return hits


def _check_k(k) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise QueryError(f"K must be a whole number, got {k!r}") from None
    if not 1 <= k <= MAX_K:
        raise QueryError(f"K must be between 1 and {MAX_K}, got {k}")
    return k


def _summary(hits: list[dict], true_item: str | None, box, seconds: float) -> str:
    searched = "the whole photo" if box is None else "the box " + ",".join(map(str, box))
    text = f"top {len(hits)} shop images for {searched}, answered in {seconds * 1000:.0f} ms."
    if true_item is None:
        return text
    found = [hit["rank"] for hit in hits if hit["match"]]
    verdict = (
        f"✅ true item {true_item} found at rank {found[0]}."
        if found
        else f"❌ true item {true_item} is not in the top {len(hits)}."
    )
    return f"{verdict} {text}"


# ----------------------------------------------------------------------------------------
# Loading (cached) and the Gradio UI
# ----------------------------------------------------------------------------------------


def listed_queries(table_path: str | Path, split: str, gallery: pd.DataFrame, limit: int = MAX_LISTED_QUERIES):
    """Consumer photos of ``split`` whose item has a gallery image, in path order (at most ``limit``)."""
    columns = ["path", "item_id", "domain", "split", "category", "x_1", "y_1", "x_2", "y_2"]
    table = pd.read_csv(table_path, dtype={"path": str, "item_id": str}, usecols=columns)
    rows = table[(table.domain == "consumer") & (table.split == split) & table.item_id.isin(set(gallery.item_id))]
    return rows.drop_duplicates("path").sort_values("path").head(limit)


@lru_cache(maxsize=4)
def load_app(
    index_dir: str, data_root: str | None = None, table: str | None = None, runtime: str = "torch"
) -> SearchApp:
    """Load an index once per process (every query after the first reuses model and embeddings)
    and set this process to :data:`QUERY_THREADS` torch threads (onnxruntime takes as many).
    ``runtime`` embeds the queries: ``torch`` or ``onnx`` (an index built with ``--runtime onnx``).

    ``data_root`` / ``table`` default to what the index recorded when it was built; without a
    readable table the app has no test queries but answers uploads. The study's results of the
    index's profile (``results/<profile>``) give the page its numbers on the garment box.
    """
    import torch

    from helpers.core.config import PROFILES
    from helpers.evaluation.retriever import Retriever
    from helpers.experiments import artifacts

    # Once for the process that serves queries, not per query: changing the count rebuilds
    # torch's thread pool (measured: +55 ms per query when set and restored around each one).
    torch.set_num_threads(QUERY_THREADS)
    retriever = Retriever.load(index_dir, runtime=runtime)
    meta = retriever.index.meta
    root = Path(data_root or meta.get("data_root") or ".").resolve()
    if not root.is_dir():
        raise InputError(f"{root}: the index's data root (its shop images) is not here; pass --data-root")
    table = table or meta.get("table")
    queries = None
    if table and Path(table).is_file():
        queries = listed_queries(table, meta.get("split", "test"), retriever.gallery)
    profile = retriever.index.run_config.get("profile")
    results = artifacts.results_root(profile) if profile in PROFILES else None
    app = SearchApp(retriever, root, queries, (root / artifacts.SYNTHETIC_MARKER).is_file(), results)
    # Warm up: the first forward pass builds the model and allocates; users should not wait for it.
    app.answer(Image.new("RGB", (64, 64), (128, 128, 128)), k=1)
    return app


def shown_path(path: str | Path) -> str:
    """``path`` as the page may show it: relative to the repository when inside it, else only its
    folder name. The page reaches whoever has its link (``--share``), not only this machine's user."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else resolved.name


def describe(app: SearchApp) -> str:
    data = (
        "**synthetic demo data** (generated by `helpers.data.synthetic`, not DeepFashion)"
        if app.synthetic
        else f"the images under `{shown_path(app.data_root)}`"
    )
    return (
        f"Gallery: {app.n_gallery} shop images from {data}, embedded once when the index was built. "
        f"Post-processing of the ranking: {app.retriever.index.postprocess.label()}; "
        f"queries embedded with {app.retriever.runtime}. "
        "Upload a consumer photo (or use the webcam, or pick a test query), drag a box around the garment "
        "on it, choose K and press **Search**."
    )


def box_advice(results: str | Path | None) -> str:
    """Why to draw the box, in one or two sentences: with the numbers of the study's crop experiment
    (``<results>/crop/``, read now, so the page never carries a typed number) when it has been run."""
    advice = "**Drag a box around the garment** on the photo (no box: the whole photo is searched). "
    folder = None if results is None else Path(results) / CROP_EXPERIMENT
    if folder is None or not (folder / "comparison.csv").is_file() or not (folder / "decision.json").is_file():
        return advice + "The search embeds what is in the box: a whole photo adds its background and other clothes."
    try:
        comparison = pd.read_csv(folder / "comparison.csv", index_col="variant")
        decision = json.loads((folder / "decision.json").read_text())
        metric, split = decision["primary"], decision["split"]
        # The study's variants of this experiment (helpers.experiments.study): the baseline crops to the box.
        whole, boxed = comparison.loc["crop=False"], comparison.loc["baseline"]
        data = "synthetic demo data, not DeepFashion" if decision["profile"] != "full" else "DeepFashion C2S"
        # An exploratory variant runs fewer seeds than the baseline: each mean is over its own
        # seeds, the difference over the seeds both ran (helpers.experiments.comparison.paired_tests).
        n_whole, n_boxed = int(whole["n_seeds"]), int(boxed["n_seeds"])
        finding = (
            f"In the study's crop experiment ({data}), searching with the whole photo instead of the garment box "
            f"scored {split} {metric} {whole[f'{split}_{metric}_mean']:.3f} ({_seeds(n_whole)}) against "
            f"{boxed[f'{split}_{metric}_mean']:.3f} ({_seeds(n_boxed)}) (difference over the "
            f"{_seeds(min(n_whole, n_boxed))} both ran {whole[f'diff_{metric}']:+.3f}, "
            f"{decision['ci_percent']} % interval [{whole[f'low_{metric}']:+.3f}, {whole[f'high_{metric}']:+.3f}]: "
            f"{whole[f'verdict_{metric}']})."
        )
    except (OSError, KeyError, TypeError, ValueError) as error:  # a study of another format: no numbers
        log.warning("%s: crop experiment unreadable (%s)", folder, _reason(error))
        return box_advice(None)
    return advice + finding


def _seeds(n: int) -> str:
    return f"{n} seed" + "s" * (n != 1)


def _raw_annotation(component):
    """A ``preprocess`` for the box-drawing component that hands the handler the uploaded file
    untouched, with the drawn boxes and quarter turns as the page sent them.

    The component decodes the upload itself before the handler runs, so a corrupt file would end
    in Gradio's generic "Error" instead of our message; this way decoding (and every check)
    happens in :func:`decode_image`, and the box in :func:`parse_box`. Set on the instance rather
    than by subclassing: Gradio writes a ``.pyi`` stub next to any module that defines a component.
    """

    def preprocess(payload):
        if payload is None:
            return None
        return {"image": str(payload.image.path), "boxes": payload.boxes, "orientation": payload.orientation}

    return preprocess


def search_page(app: SearchApp, annotated: dict | None, query: str | None, k) -> Answer:
    """The page's **Search**: the box-drawing component's value (the photo, the box drawn on it
    and the quarter turns it was given) and the test query picked, if any."""
    annotated = annotated or {}
    boxes = annotated.get("boxes") or []  # at most one (single_box); the newest comes first
    return app.answer(
        image=annotated.get("image"),
        query=query or None,
        box=boxes[0] if boxes else None,
        k=k,
        turns=annotated.get("orientation"),
    )


def build_blocks(app: SearchApp):
    """The Gradio UI over ``app``'s handlers (the same functions the tests call)."""
    import gradio as gr
    from gradio_image_annotation import image_annotator

    def search(annotated, query, k):
        result = search_page(app, annotated, query, k)
        return result.gallery(), result.message, hit_table(result.hits)

    def pick(label):
        if not label:
            return None, ""
        try:
            return app.query_annotation(label), ""
        except QueryError as error:
            return None, f"⚠️ {error}"

    with gr.Blocks(title="C2S clothing retrieval: live demo") as blocks:
        gr.Markdown("# Consumer-to-shop retrieval: find the shop photos of a garment\n" + describe(app))
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown(box_advice(app.results), elem_id="box-advice")
                photo = image_annotator(
                    label="consumer photo: drag a box around the garment",
                    sources=["upload", "webcam", "clipboard"],
                    single_box=True,
                    disable_edit_boxes=True,  # a box needs no label here
                    show_remove_button=True,  # removing the box searches the whole photo
                    elem_id="query-image",
                )
                photo.preprocess = _raw_annotation(photo)
                query = gr.Dropdown(
                    choices=app.query_choices(), value=None, label="…or pick a test query", elem_id="test-query"
                )
                k = gr.Slider(1, 20, value=5, step=1, label="K (shop images to show)", elem_id="k")
                button = gr.Button("Search", variant="primary", elem_id="search")
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                results = gr.Gallery(label="top-K shop images", columns=5, object_fit="contain", elem_id="results")
                table = gr.Dataframe(
                    headers=list(HIT_COLUMNS), label="the same hits as a table", interactive=False, elem_id="hits"
                )
        button.click(search, [photo, query, k], [results, status, table], api_name="search")
        query.input(pick, [query], [photo, status], api_name=False)
        # A new or removed photo is not the test query any more: forget the choice.
        photo.upload(lambda: None, None, [query], api_name=False)
        photo.clear(lambda: None, None, [query], api_name=False)
    return blocks


def serve(
    index_dir: str | Path,
    port: int = 7860,
    host: str = "127.0.0.1",
    data_root: str | None = None,
    share: bool = False,
    block: bool = True,
    runtime: str = "torch",
):
    """Launch the app; queries are queued and run one at a time (see the module docstring)."""
    app = load_app(str(index_dir), data_root, runtime=runtime)
    blocks = build_blocks(app).queue(default_concurrency_limit=1, max_size=64)
    blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(app.data_root)],
        max_file_size=MAX_UPLOAD_BYTES,
        prevent_thread_lock=not block,
        show_error=False,
        inline=False,
    )
    return blocks


def launch_inline(app: SearchApp, share: bool = False, port: int | None = None):
    """Serve ``app`` from a notebook without blocking it: the page shows inline (Jupyter,
    Colab) and, with ``share``, behind a temporary public link (Colab's localhost is not
    yours). Returns the Blocks; ``.close()`` stops the server."""
    blocks = build_blocks(app).queue(default_concurrency_limit=1, max_size=64)
    blocks.launch(
        server_name="127.0.0.1",
        server_port=port,
        share=share,
        inline=True,
        prevent_thread_lock=True,
        allowed_paths=[str(app.data_root)],
        max_file_size=MAX_UPLOAD_BYTES,
    )
    return blocks


HIT_COLUMNS = ("rank", "item_id", "category", "score", "true item", "path")


MATCH_WORDS = {True: "yes", False: "no", None: "unknown"}  # None: an upload, whose true item nobody knows


def hit_table(hits: Sequence[dict]) -> pd.DataFrame:
    """The hits as a table (the UI shows it under the images; notebooks print it)."""
    return pd.DataFrame(
        [
            (h["rank"], h["item_id"], h["category"], round(h["score"], 4), MATCH_WORDS[h.get("match")], h["path"])
            for h in hits
        ],
        columns=list(HIT_COLUMNS),
    )
