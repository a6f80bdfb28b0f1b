"""A DeepFashion-C2S-format tree made WITHOUT helpers.data.synthetic, to check the pipeline on data
this project's generator did not write (other shapes, textures, transforms and list writer).

Items are smooth random-texture patches cut into random polygons; a shop photo shows the patch
upright on white, a consumer photo a perspective-warped, colour-shifted, blurred copy pasted
on a scikit-image photo. The script also writes ``truth.json`` with counts computed from what
it wrote, to compare with ``prepare`` and ``evaluate``.

    python tests/independent_tree.py OUT_DIR [--items 160] [--seed 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from skimage import data as skdata

BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "horse", "camera")
FOLDERS = (("TOPS", "Blouse", 1), ("DRESSES", "Maxi_Dress", 3), ("TROUSERS", "Pants", 2))


def texture(rng: np.random.Generator, size: int = 160) -> Image.Image:
    """Low-frequency random texture: a few random sinusoids per channel."""
    y, x = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        field = np.zeros((size, size))
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.5, 6), rng.uniform(0.5, 6), rng.uniform(0, 2 * np.pi)
            field += np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        channels.append(rng.uniform(40, 120) + rng.uniform(30, 60) * field / 3)
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def polygon_mask(rng: np.random.Generator, size: int = 160) -> Image.Image:
    angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 9)))
    radii = rng.uniform(0.3, 0.5, len(angles)) * size
    points = [(size / 2 + r * np.cos(a), size / 2 + r * np.sin(a)) for r, a in zip(radii, angles)]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return mask


def place(canvas: Image.Image, patch: Image.Image, mask: Image.Image, x: int, y: int) -> tuple[int, int, int, int]:
    canvas.paste(patch, (x, y), mask)
    left, top, right, bottom = mask.getbbox()
    return x + left, y + top, x + right, y + bottom


def shop_photo(patch, mask) -> tuple[Image.Image, tuple]:
    canvas = Image.new("RGB", (220, 300), (245, 245, 245))
    return canvas, place(canvas, patch, mask, 30, 70)


def consumer_photo(patch, mask, rng: np.random.Generator) -> tuple[Image.Image, tuple]:
    background = Image.fromarray(getattr(skdata, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])()).convert("RGB")
    background = background.resize((300, 300)).crop((0, 0, 300, int(rng.integers(220, 301))))
    angle, scale = rng.uniform(-25, 25), rng.uniform(0.7, 1.2)
    size = int(160 * scale)
    patch = patch.resize((size, size)).rotate(angle, expand=True)
    mask = mask.resize((size, size)).rotate(angle, expand=True)
    patch = ImageEnhance.Color(ImageEnhance.Brightness(patch).enhance(rng.uniform(0.6, 1.4))).enhance(
        rng.uniform(0.6, 1.4)
    )
    patch = patch.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
    x = int(rng.integers(0, max(1, background.width - patch.width)))
    y = int(rng.integers(0, max(1, background.height - patch.height)))
    box = place(background, patch, mask, x, y)
    return background, (box[0], box[1], min(box[2], background.width), min(box[3], background.height))


def write_list(path: Path, rows: list[tuple], header: str | None) -> None:
    lines = [str(len(rows))] + ([header] if header else [])
    lines += ["    ".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def build(out: Path, n_items: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    bbox_rows, pair_rows, items = [], [], []
    splits = np.array(
        ["train"] * (n_items // 2) + ["val"] * (n_items // 4) + ["test"] * (n_items - n_items // 2 - n_items // 4)
    )
    truth = {s: {"items": 0, "consumer_images": 0, "shop_images": 0} for s in ("train", "val", "test")}
    for i in range(n_items):
        item = f"id_{i + 1:08d}"
        category, subcategory, clothes_type = FOLDERS[i % len(FOLDERS)]
        folder = f"img/{category}/{subcategory}/{item}"
        (out / folder).mkdir(parents=True)
        patch, mask = texture(rng), polygon_mask(rng)
        image, box = shop_photo(patch, mask)
        shop = f"{folder}/shop_01.jpg"
        image.save(out / shop, quality=90)
        bbox_rows.append((shop, clothes_type, 1, *box))
        consumers = []
        for j in range(int(rng.integers(2, 5))):
            image, box = consumer_photo(patch, mask, rng)
            name = f"{folder}/comsumer_{j + 1:02d}.jpg"
            image.save(out / name, quality=85)
            bbox_rows.append((name, clothes_type, 2, *box))
            consumers.append(name)
        pair_rows += [(c, shop, item, splits[i]) for c in consumers]
        items.append(item)
        truth[splits[i]]["items"] += 1
        truth[splits[i]]["consumer_images"] += len(consumers)
        truth[splits[i]]["shop_images"] += 1
    (out / "Anno").mkdir()
    (out / "Eval").mkdir()
    write_list(
        out / "Anno/list_bbox_consumer2shop.txt", bbox_rows, "image_name clothes_type source_type x_1 y_1 x_2 y_2"
    )
    write_list(out / "Anno/list_item_consumer2shop.txt", [(i,) for i in items], None)
    write_list(
        out / "Eval/list_eval_partition.txt", pair_rows, "image_pair_name_1 image_pair_name_2 item_id evaluation_status"
    )
    # The official protocol on the test split: queries = test consumer images, gallery = val + test shop images.
    official = {
        "n_queries": truth["test"]["consumer_images"],
        "n_gallery": truth["val"]["shop_images"] + truth["test"]["shop_images"],
    }
    result = {"splits": truth, "official_test": official}
    (out / "truth.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--items", type=int, default=160)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(build(Path(args.out), args.items, args.seed), indent=2))
