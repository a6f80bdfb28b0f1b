"""ONNX export (helpers.modeling.export, `python -m helpers export`): the exported model embeds real
images as PyTorch does, at any batch size, its sidecar says how to preprocess them, and a checkpoint
it cannot export gets one line naming the file."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict

import numpy as np
import pytest
import torch
from app_support import fixture_index

from helpers.apps.cli import main
from helpers.core import config
from helpers.core.errors import InputError
from helpers.core.files import sha256_file
from helpers.core.schema import read_table
from helpers.experiments import artifacts
from helpers.modeling import checkpoints, export, models
from helpers.modeling.onnx_embedder import load_onnx, sidecar_path


@pytest.fixture(scope="module")
def fixture_data():
    root, table = artifacts.ensure_prepared(config.get_config("fixture"), progress=False)
    return root, table


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The fixture model trained one epoch (shared with the app's tests in one session)."""
    return fixture_index(tmp_path_factory).parent / "run" / "best.pt"


@pytest.fixture(scope="module")
def exported(checkpoint, fixture_data, tmp_path_factory):
    root, table = fixture_data
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert (
            main(
                ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--table", str(table)]
                + ["--data-root", str(root)]
            )
            == 0
        )
    assert f"wrote {out} and {out}.json" in stdout.getvalue()
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_export_embeds_real_images_as_pytorch_at_any_batch_size(exported, checkpoint, fixture_data):
    root, table = fixture_data
    embedder, cfg = checkpoints.load_embedder(checkpoint)
    onnx_embedder, onnx_cfg, _ = load_onnx(exported)
    assert onnx_cfg == cfg and onnx_embedder.data_config == embedder.data_config
    rows = read_table(table)
    batch = export.check_batch(cfg, embedder.data_config, rows[rows.split == "test"], root, 12)
    with torch.inference_mode():
        expected = embedder(batch).numpy()
        for size in (1, 5, len(batch)):  # traced with 2 images: the batch axis is dynamic
            got = onnx_embedder(batch[:size]).numpy()
            assert got.shape == (size, cfg.embed_dim)
            assert _cosines(expected[:size], got).min() >= 1 - 1e-4


def test_the_sidecar_records_the_preprocessing_and_the_checkpoint(exported, checkpoint):
    record = json.loads(sidecar_path(exported).read_text())
    embedder, cfg = checkpoints.load_embedder(checkpoint)
    data = embedder.data_config
    assert record["preprocessing"] == {
        "input_size": data["input_size"],
        "mean": data["mean"],
        "std": data["std"],
        "interpolation": data["interpolation"],
        "resize": cfg.resize,
        "letterbox_fill": record["preprocessing"]["letterbox_fill"],
        "box_margin": cfg.box_margin,
        "crop": cfg.crop,
        "photometric": cfg.photometric,
        "flip_tta": cfg.flip_tta,
        "channels": "RGB",
        "scale": "pixels / 255, then (x - mean) / std",
    }
    assert (record["embed_dim"], record["backbone"]) == (cfg.embed_dim, cfg.backbone)
    assert record["checkpoint_sha256"] == sha256_file(checkpoint)
    assert record["onnx_sha256"] == sha256_file(exported)
    assert record["input"]["shape"] == ["batch", *data["input_size"]]
    assert record["check"]["images"] == export.CHECK_IMAGES and record["check"]["min_cosine"] >= 1 - 1e-4


def test_the_demo_backbone_exports(fixture_data, tmp_path):
    # Lite0 with its packaged ImageNet weights (the demo model's backbone; head untrained), on real images.
    root, table = fixture_data
    cfg = config.get_config("demo", weights="packaged")
    embedder = models.create_embedder(cfg.backbone, cfg.embed_dim, cfg.weights, img_size=160)
    state = {"model": embedder.state_dict(), "model_config": embedder.config, "config": asdict(cfg)}
    checkpoints.save_checkpoint(tmp_path / "best.pt", state)
    record = export.export_onnx(tmp_path / "best.pt", tmp_path / "lite0.onnx", table, root)
    assert record["backbone"] == "tf_efficientnet_lite0" and record["check"]["min_cosine"] >= 1 - 1e-4


def _export_error(*argv: str) -> str:
    stderr = io.StringIO()
    with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        assert main(["export", *argv]) == 2
    message = stderr.getvalue()
    assert message.startswith("error: ") and message.count("\n") == 1
    return message


def test_a_checkpoint_it_cannot_export_is_one_line_naming_it(fixture_data, checkpoint, tmp_path, monkeypatch):
    root, table = fixture_data
    data = ["--table", str(table), "--data-root", str(root)]
    out = tmp_path / "model.onnx"
    missing = tmp_path / "missing.pt"
    assert f"{missing}: checkpoint not found" in _export_error("--checkpoint", str(missing), "--out", str(out), *data)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert f"{text}: not a readable checkpoint" in _export_error("--checkpoint", str(text), "--out", str(out), *data)
    wrong = _export_error("--checkpoint", str(checkpoint), "--out", str(tmp_path / "model.bin"), *data)
    assert "ends in .onnx" in wrong

    def unsupported(self, images):  # an op the exporter has no ONNX translation for
        return torch.linalg.eigvalsh(images[:, 0, :4, :4] @ images[:, 0, :4, :4].transpose(1, 2))

    monkeypatch.setattr(models.Embedder, "forward", unsupported)
    rejected = _export_error("--checkpoint", str(checkpoint), "--out", str(out), *data)
    assert f"{checkpoint}: the ONNX exporter rejects backbone test_efficientnet" in rejected
    assert "linalg_eigvalsh" in rejected
    assert not out.exists() and list(tmp_path.glob("model.onnx*")) == []  # nothing half-written


def test_an_export_that_disagrees_with_pytorch_is_not_written(checkpoint, fixture_data, tmp_path, monkeypatch):
    root, table = fixture_data
    real = export.OnnxEmbedder.forward
    monkeypatch.setattr(export.OnnxEmbedder, "forward", lambda self, images: real(self, images).flip(1))
    with pytest.raises(InputError, match="onnxruntime's embeddings differ from PyTorch's"):
        export.export_onnx(checkpoint, tmp_path / "model.onnx", table, root)
    assert list(tmp_path.iterdir()) == []


def test_a_model_and_a_sidecar_that_do_not_belong_together_are_refused(exported, tmp_path):
    copy = tmp_path / "model.onnx"
    copy.write_bytes(exported.read_bytes() + b"\0")
    sidecar_path(copy).write_text(sidecar_path(exported).read_text())
    with pytest.raises(InputError, match="does not match its sidecar model.onnx.json"):
        load_onnx(copy)
    with pytest.raises(InputError, match="other.onnx: not found"):
        load_onnx(exported.with_name("other.onnx"))
