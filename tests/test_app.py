"""The live demo's handlers (helpers.apps.app), with image bytes for every bad upload, and the served
app through gradio_client: a bad query gets a message and the next query is still answered."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from app_support import bad_uploads, encode, exif_rotated_jpeg, fixture_index, odd_but_valid_uploads, photo
from PIL import Image

from helpers.apps import app
from helpers.apps.cli import main
from helpers.core.config import REPO_ROOT
from helpers.data import transforms


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return fixture_index(tmp_path_factory)


@pytest.fixture(scope="module")
def demo(index_dir):
    return app.load_app(str(index_dir))


def test_the_index_loads_once_per_process(index_dir, demo):
    assert app.load_app(str(index_dir)) is demo
    assert demo.synthetic  # the fixture tree is generated: the UI must say so
    assert "synthetic demo data" in app.describe(demo)


@pytest.mark.parametrize("name", sorted(bad_uploads()))
def test_a_bad_upload_gets_a_message_and_the_next_query_is_answered(demo, name):
    answer = demo.answer(bad_uploads()[name], k=3)
    assert not answer.ok and answer.hits == []
    assert answer.message.startswith("⚠️ ") and "\n" not in answer.message
    expected = {
        "not an image": "not an image",
        "html": "not an image",
        "empty": "empty",
        "truncated jpeg": "truncated",
        "truncated png": "truncated",
        "jpeg header only": "truncated",
        "bomb 400 MP": "megapixels",
        "bomb 100 MP": "megapixels",
        "1x1": "too small",
    }[name]
    assert expected in answer.message
    assert demo.answer(encode(photo(), "JPEG"), k=3).ok


@pytest.mark.parametrize("name", sorted(odd_but_valid_uploads()))
def test_unusual_but_valid_images_are_searched(demo, name):
    answer = demo.answer(odd_but_valid_uploads()[name], k=4)
    assert answer.ok, answer.message
    assert [hit["rank"] for hit in answer.hits] == [1, 2, 3, 4]
    assert all(np.isfinite(hit["score"]) for hit in answer.hits)


def test_exif_orientation_is_applied():
    # Stored 40×80 with red on top; orientation 6 means "turn 90° clockwise to view".
    image = app.decode_image(exif_rotated_jpeg())
    assert image.size == (80, 40)
    right, left = image.getpixel((70, 20)), image.getpixel((10, 20))
    assert right[0] > 200 and right[2] < 60  # red on the right
    assert left[2] > 200 and left[0] < 60  # blue on the left


def test_transparency_is_shown_over_white_not_black():
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert app.decode_image(encode(clear)).getpixel((5, 5)) == (255, 255, 255)
    half = Image.new("RGBA", (32, 32), (0, 0, 0, 128))
    assert app.decode_image(encode(half)).getpixel((5, 5)) == (127, 127, 127)


def test_16_bit_gray_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    image = app.decode_image(encode(Image.fromarray(ramp)))
    row = [image.getpixel((x, 0))[0] for x in range(32)]
    assert row[0] == 0 and row[-1] == 255 and row == sorted(row)


@pytest.mark.parametrize(
    "box, message",
    [
        ("500,500,600,600", "outside the 96×128 image"),
        ("-50,-50,-10,-10", "outside"),
        ("10,10,5,40", "empty"),
        ("10,10,20", "four numbers"),
        ("a,b,c,d", "four numbers"),
        ("nan,1,2,3", "four numbers"),
    ],
)
def test_a_bad_crop_gets_a_message(demo, box, message):
    answer = demo.answer(encode(photo(), "PNG"), box=box)
    assert not answer.ok and message in answer.message


def test_a_crop_partly_outside_is_clipped_to_the_image():
    assert app.parse_box("-10,20,50,1000", (96, 128)) == (0, 20, 50, 128)
    assert app.parse_box(" ", (96, 128)) is None


@pytest.mark.parametrize("k", [0, -1, 51, "x", None])
def test_a_bad_k_gets_a_message(demo, k):
    answer = demo.answer(encode(photo()), k=k)
    assert not answer.ok and "K must" in answer.message


def test_the_crop_changes_what_is_searched(demo):
    # Left half noise, right half flat grey: cropping to either must change the embedding.
    image = photo(96, 96)
    image.paste((128, 128, 128), (48, 0, 96, 96))
    data = encode(image)
    left = demo.answer(data, box="0,0,48,96", k=demo.n_gallery)
    right = demo.answer(data, box="48,0,96,96", k=demo.n_gallery)
    assert [h["score"] for h in left.hits] != pytest.approx([h["score"] for h in right.hits])


def test_a_test_query_reports_its_true_item(demo):
    label = demo.query_choices()[0]
    path, box = demo.query_example(label)
    answer = demo.answer(query=label, box=box, k=demo.n_gallery)
    assert answer.ok and answer.true_item == demo.queries[label].item_id
    # With K = the whole gallery the true item is always found, and marked on its own hits only.
    assert any(hit["true"] for hit in answer.hits) and "found at rank" in answer.message
    assert all(hit["true"] == (hit["item_id"] == answer.true_item) for hit in answer.hits)
    assert "✓ true item" in app.caption(next(h for h in answer.hits if h["true"]))
    assert not demo.answer(query="no such query").ok


def test_the_cli_search_and_the_app_return_the_same_top_k(index_dir, demo):
    label = demo.query_choices()[1]
    path, box = demo.query_example(label)
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert main(["search", "--index", str(index_dir), path, "--box", box, "-k", "5", "--json"]) == 0
    cli = json.loads(stdout.getvalue())
    with open(path, "rb") as handle:
        answer = demo.answer(handle.read(), box=box, k=5)
    assert [(h["item_id"], h["path"]) for h in answer.hits] == [(h["item_id"], h["path"]) for h in cli]
    assert [h["score"] for h in answer.hits] == pytest.approx([h["score"] for h in cli], abs=1e-5)


def _cli_search(*argv: str) -> list[dict]:
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert main(["search", *argv, "--json"]) == 0
    return json.loads(stdout.getvalue())


def test_a_phone_photo_gets_the_same_answer_from_the_cli_and_the_app(index_dir, demo, tmp_path):
    # A test query as a phone stores a photo taken sideways: pixels turned 90° counter-clockwise,
    # EXIF orientation 6 ("turn 90° clockwise to view").
    upright = transforms.open_rgb(demo.query_example(demo.query_choices()[2])[0])
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = tmp_path / "phone.jpg"
    upright.rotate(90, expand=True).save(sideways, quality=95, exif=exif)
    k = demo.n_gallery  # every score, so a different picture cannot go unnoticed
    cli = _cli_search("--index", str(index_dir), str(sideways), "-k", str(k))
    answer = demo.answer(sideways.read_bytes(), k=k)
    assert answer.ok, answer.message
    assert [h["item_id"] for h in answer.hits] == [h["item_id"] for h in cli]
    assert [h["score"] for h in answer.hits] == pytest.approx([h["score"] for h in cli], abs=1e-5)
    with Image.open(sideways) as stored:  # the stored pixels, as a decoder that ignores EXIF sees them
        raw = demo.index.search_image(stored.convert("RGB"), k=k)
    assert [h["score"] for h in raw] != pytest.approx([h["score"] for h in cli], abs=1e-3)


@pytest.mark.parametrize(
    "content, reason",
    [
        ("not a photo\n", "this file is not an image (or not a format Pillow reads: use JPEG, PNG or WebP)"),
        (None, "no such image file"),
    ],
)
def test_a_photo_the_cli_cannot_read_is_one_line_naming_it(index_dir, tmp_path, content, reason):
    photo_path = tmp_path / "photo.jpg"
    if content is not None:
        photo_path.write_text(content)
    stderr = io.StringIO()
    with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        assert main(["search", "--index", str(index_dir), str(photo_path)]) == 2
    assert stderr.getvalue() == f"error: {photo_path}: {reason}\n"


def test_the_page_shows_no_absolute_path_of_the_server(demo, tmp_path):
    outside = app.SearchApp(demo.index, tmp_path / "shop_images")
    text = app.describe(outside)
    assert "`shop_images`" in text
    assert str(tmp_path) not in text and "`/" not in text
    inside = app.SearchApp(demo.index, REPO_ROOT / "data" / "shop_images")
    assert "`data/shop_images`" in app.describe(inside) and str(REPO_ROOT) not in app.describe(inside)
    pytest.importorskip("gradio")
    blocks = app.build_blocks(outside)
    shown = " ".join(str(getattr(block, "value", "")) for block in blocks.blocks.values())
    assert "shop_images" in shown and str(tmp_path) not in shown


def test_the_served_app_survives_bad_queries(index_dir, tmp_path, free_port):
    gradio_client = pytest.importorskip("gradio_client")
    port = free_port()
    blocks = app.serve(index_dir, port=port, block=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        good = tmp_path / "good.jpg"
        good.write_bytes(encode(photo(), "JPEG"))
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not the rest of a JPEG")
        for upload, ok in ((good, True), (bad, False), (good, True)):
            gallery, message, table = client.predict(
                gradio_client.handle_file(str(upload)), None, "", 3, api_name="/search"
            )
            assert (len(gallery), message.startswith("⚠️")) == ((3, False) if ok else (0, True)), message
    finally:
        blocks.close()
