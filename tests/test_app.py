"""The live demo's handlers (helpers.apps.app), with image bytes for every bad upload, and the served
app through gradio_client: a bad query gets a message and the next query is still answered."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pandas as pd
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


def _drawn(xmin, ymin, xmax, ymax, **extra) -> dict:
    """A box as the box-drawing component sends it: screen pixels of the shown photo, a colour and
    the shown/actual size ratio (``scaleFactor``), which the page sets when it shrinks a photo."""
    return {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax, "label": "", "color": "rgb(255, 0, 0)", **extra}


def test_a_drawn_box_is_read_in_the_photo_s_pixels_as_the_component_reads_it():
    # A 1200×900 photo shown 478 px wide (scale 478/1200): the box's screen pixels over the scale.
    scale = 478 / 1200
    drawn = _drawn(47.8, 39.83, 318.67, 298.75, scaleFactor=scale)
    assert app.parse_box(drawn, (1200, 900)) == (120, 100, 800, 750)
    annotation = pytest.importorskip("gradio_image_annotation")
    (own,) = annotation.image_annotator().preprocess_boxes([drawn])  # the component's own conversion
    assert app.parse_box(drawn, (1200, 900)) == tuple(own[key] for key in app.BOX_KEYS)
    assert app.parse_box(_drawn(10, 20, 30, 40), (96, 128)) == (10, 20, 30, 40)  # no scaleFactor: pixels


def test_a_drawn_box_partly_outside_is_clipped_to_the_photo():
    assert app.parse_box(_drawn(-8, 30, 140, 500), (96, 128)) == (0, 30, 96, 128)
    assert app.parse_box(_drawn(-4, -2, 50, 60, scaleFactor=0.5), (96, 128)) == (0, 0, 96, 120)


@pytest.mark.parametrize(
    "drawn, message",
    [
        (_drawn(40, 10, 40, 60), "the drawn box is empty"),  # zero width: a click, not a drag
        (_drawn(40, 60, 80, 10), "the drawn box is empty"),
        (_drawn(200, 200, 300, 300), "the drawn box lies outside the 96×128 image"),
        (_drawn(10, 10, 50, 50, scaleFactor=0), "the drawn box: expected four numbers"),
        ({"xmin": 10, "ymin": 10, "xmax": 50}, "the drawn box: expected four numbers"),
        (_drawn("a", 10, 50, 50), "the drawn box: expected four numbers"),
    ],
)
def test_a_degenerate_drawn_box_gets_a_one_line_message(demo, drawn, message):
    answer = app.search_page(demo, {"image": encode(photo(), "PNG"), "boxes": [drawn], "orientation": 0}, None, 3)
    assert not answer.ok and answer.hits == []
    assert answer.message.startswith(f"⚠️ {message}")
    assert "\n" not in answer.message


def test_no_drawn_box_searches_the_whole_photo(demo):
    data = encode(photo(), "PNG")
    page = app.search_page(demo, {"image": data, "boxes": [], "orientation": 0}, None, demo.n_gallery)
    assert page.ok and page.box is None and "for the whole photo" in page.message
    direct = demo.answer(data, k=demo.n_gallery)
    assert [h["path"] for h in page.hits] == [h["path"] for h in direct.hits]
    assert [h["score"] for h in page.hits] == pytest.approx([h["score"] for h in direct.hits], abs=1e-6)
    nothing = app.search_page(demo, None, None, 3)  # no photo at all (the page's photo removed)
    assert not nothing.ok and nothing.message.startswith("⚠️ no image")


def test_the_drawn_box_is_what_is_searched(demo):
    data = encode(photo(96, 128, seed=3), "PNG")
    drawn = app.search_page(demo, {"image": data, "boxes": [_drawn(10, 20, 60, 100)]}, None, demo.n_gallery)
    assert drawn.ok and drawn.box == (10, 20, 60, 100) and "for the box 10,20,60,100" in drawn.message
    typed = demo.answer(data, box="10,20,60,100", k=demo.n_gallery)
    assert [h["path"] for h in drawn.hits] == [h["path"] for h in typed.hits]
    assert [h["score"] for h in drawn.hits] == pytest.approx([h["score"] for h in typed.hits], abs=1e-6)
    whole = demo.answer(data, k=demo.n_gallery)
    assert [h["score"] for h in drawn.hits] != pytest.approx([h["score"] for h in whole.hits], abs=1e-4)


def test_a_photo_turned_on_the_page_is_searched_turned_with_its_box(demo):
    # One click on "rotate clockwise" shows the 96×128 photo 128×96; the box is drawn on that view.
    picture = photo(96, 128, seed=4)
    value = {"image": encode(picture, "PNG"), "boxes": [_drawn(70, 5, 125, 90)], "orientation": 1}
    page = app.search_page(demo, value, None, demo.n_gallery)
    assert page.ok and page.box == (70, 5, 125, 90)
    turned = picture.transpose(Image.Transpose.ROTATE_270)
    assert turned.size == (128, 96) and turned.getpixel((127, 0)) == picture.getpixel((0, 0))  # clockwise
    direct = demo.answer(turned, box=(70, 5, 125, 90), k=demo.n_gallery)
    assert [h["score"] for h in page.hits] == pytest.approx([h["score"] for h in direct.hits], abs=1e-6)
    bad = app.search_page(demo, {**value, "orientation": 5}, None, 3)
    assert not bad.ok and "rotation must be 0-3 quarter turns" in bad.message


def test_a_listed_query_comes_with_its_annotated_box_on_its_stored_pixels(demo):
    label = demo.query_choices()[0]
    row = demo.queries[label]
    value = demo.query_annotation(label)
    stored = transforms.open_rgb(demo.data_root / row.path)  # the dataset's pixels, no EXIF turn
    assert value["image"].size == stored.size and value["image"].tobytes() == stored.tobytes()
    assert value["boxes"] == [{"xmin": row.x_1, "ymin": row.y_1, "xmax": row.x_2, "ymax": row.y_2}]
    page = app.search_page(demo, {"image": None, **value}, label, demo.n_gallery)
    typed = demo.answer(query=label, box=demo.query_example(label)[1], k=demo.n_gallery)
    assert page.ok and page.box == (row.x_1, row.y_1, row.x_2, row.y_2) and page.true_item == row.item_id
    assert [h["path"] for h in page.hits] == [h["path"] for h in typed.hits]
    with pytest.raises(app.QueryError, match="unknown test query"):
        demo.query_annotation("no such query")


def test_the_page_says_why_the_box_matters_with_the_study_s_numbers(tmp_path):
    committed = REPO_ROOT / "results" / "demo"
    comparison = pd.read_csv(committed / "crop" / "comparison.csv", index_col="variant")
    text = app.box_advice(committed)
    whole, boxed = comparison.loc["crop=False"], comparison.loc["baseline"]
    n_whole, n_boxed = int(whole["n_seeds"]), int(boxed["n_seeds"])
    assert (
        f"val recall@5 {whole['val_recall@5_mean']:.3f} ({n_whole} seeds) against "
        f"{boxed['val_recall@5_mean']:.3f} ({n_boxed} seeds)"
    ) in text
    assert f"over the {min(n_whole, n_boxed)} seeds both ran {whole['diff_recall@5']:+.3f}" in text
    assert "synthetic demo data, not DeepFashion" in text
    # Read, not typed: other numbers in the file are other numbers on the page; an exploratory
    # whole photo on fewer seeds than the baseline says so.
    (tmp_path / "crop").mkdir()
    (tmp_path / "crop" / "decision.json").write_text((committed / "crop" / "decision.json").read_text())
    comparison.loc["crop=False", "val_recall@5_mean"] = 0.123456
    comparison.loc["crop=False", "n_seeds"], comparison.loc["baseline", "n_seeds"] = 1, 5
    comparison.to_csv(tmp_path / "crop" / "comparison.csv", index_label="variant")
    text = app.box_advice(tmp_path)
    assert "val recall@5 0.123 (1 seed) against" in text and "(5 seeds)" in text and "over the 1 seed both ran" in text
    # Not run (or unreadable): the reason in words, without a number.
    for results in (None, tmp_path / "nothing"):
        assert not any(ch.isdigit() for ch in app.box_advice(results))
    (tmp_path / "crop" / "comparison.csv").write_text("variant,other\nbaseline,1\n")
    assert not any(ch.isdigit() for ch in app.box_advice(tmp_path))


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
    assert any(hit["match"] for hit in answer.hits) and "found at rank" in answer.message
    assert all(hit["match"] == (hit["item_id"] == answer.true_item) for hit in answer.hits)
    assert "✓ true item" in app.caption(next(h for h in answer.hits if h["match"]))
    table = app.hit_table(answer.hits)
    assert list(table["true item"]) == ["yes" if hit["match"] else "no" for hit in answer.hits]
    assert not demo.answer(query="no such query").ok


def test_an_upload_s_true_item_is_unknown_not_false(demo):
    # The same test photo uploaded: nobody told the app its item, so no hit is called a match or not.
    label = demo.query_choices()[0]
    path, box = demo.query_example(label)
    with open(path, "rb") as handle:
        answer = demo.answer(handle.read(), box=box, k=demo.n_gallery)
    assert answer.ok and answer.true_item is None and "true item" not in answer.message
    assert all("match" not in hit for hit in answer.hits)
    assert set(app.hit_table(answer.hits)["true item"]) == {"unknown"}
    assert not any("✓" in app.caption(hit) for hit in answer.hits)


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
        raw = demo.retriever.search(stored.convert("RGB"), k=k)
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
    outside = app.SearchApp(demo.retriever, tmp_path / "shop_images")
    text = app.describe(outside)
    assert "`shop_images`" in text
    assert str(tmp_path) not in text and "`/" not in text
    inside = app.SearchApp(demo.retriever, REPO_ROOT / "data" / "shop_images")
    assert "`data/shop_images`" in app.describe(inside) and str(REPO_ROOT) not in app.describe(inside)
    pytest.importorskip("gradio")
    blocks = app.build_blocks(outside)
    shown = " ".join(str(getattr(block, "value", "")) for block in blocks.blocks.values())
    assert "shop_images" in shown and str(tmp_path) not in shown
    assert app.box_advice(None) in shown  # the page says why to draw the box


def test_the_index_s_profile_gives_the_page_its_study_results(demo):
    from helpers.experiments import artifacts

    assert demo.results == artifacts.results_root("fixture")


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
        box = [{"xmin": 10, "ymin": 20, "xmax": 60, "ymax": 100}]
        for upload, boxes, ok in ((good, [], True), (bad, [], False), (good, box, True), (good, [{"xmin": 1}], False)):
            drawn = {"image": gradio_client.handle_file(str(upload)), "boxes": boxes, "orientation": 0}
            gallery, message, table = client.predict(drawn, None, 3, api_name="/search")
            assert (len(gallery), message.startswith("⚠️")) == ((3, False) if ok else (0, True)), message
        assert (
            "for the box 10,20,60,100"
            in client.predict(
                {"image": gradio_client.handle_file(str(good)), "boxes": box}, None, 3, api_name="/search"
            )[1]
        )
    finally:
        blocks.close()
