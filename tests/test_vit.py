"""ViT backbones (DINOv2, CLIP and SigLIP image towers through timm): pooling, input sizes snapped to
the patch, normalisation from the pretrained config, hub weights from the local cache, layer-wise
learning-rate decay and gradient checkpointing; then end to end with timm's random-init
``test_vit`` on a small synthetic tree: fit, interrupt and resume, evaluate, index, ONNX export
and a 2-process DDP run. No test touches the network."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pandas as pd
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import resample_abs_pos_embed

from helpers.apps.cli import main
from helpers.core import config
from helpers.core.errors import InputError
from helpers.evaluation import gallery
from helpers.evaluation.retriever import Retriever
from helpers.experiments import artifacts, final
from helpers.modeling import checkpoints, models
from helpers.modeling.models import create_embedder, embedder_from_config, param_groups, snap_to_patch
from helpers.training import train

VIT = "test_vit"  # class token, patch 16, 6 blocks of 64 channels


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("C2S_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone,mean,std",
    [
        ("vit_small_patch14_dinov2.lvd142m", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ("vit_base_patch16_siglip_224.webli", [0.5] * 3, [0.5] * 3),
        ("vit_base_patch16_clip_224.openai", [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    ],
)
def test_foundation_backbones_take_their_pretrained_normalisation(backbone, mean, std):
    embedder = create_embedder(backbone, weights="none", head="pooled", pooling="avg", img_size=224)
    assert (embedder.data_config["mean"], embedder.data_config["std"]) == (mean, std)
    assert embedder.data_config["input_size"] == [3, 224, 224] and embedder.data_config["interpolation"] == "bicubic"


def test_img_size_snaps_to_the_patch_once(capsys):
    assert [snap_to_patch(s, 14) for s in (1, 7, 154, 160, 161, 224)] == [14, 14, 154, 154, 168, 224]
    embedder = create_embedder("vit_small_patch14_dinov2", weights="none", pooling="cls", img_size=160)
    assert "img_size 160 snapped to 154" in capsys.readouterr().err
    assert embedder.config["img_size"] == 154 and embedder.data_config["input_size"] == [3, 154, 154]
    assert embedder.backbone.pos_embed.shape[1] == 1 + 11 * 11  # the class token + an 11 × 11 grid
    rebuilt = embedder_from_config(json.loads(json.dumps(embedder.config)))
    assert capsys.readouterr().err == "" and rebuilt.config == embedder.config
    with torch.no_grad():
        assert rebuilt.eval()(images(1, 154)).shape == (1, embedder.config["embed_dim"])


@pytest.mark.parametrize(
    "backbone,pooling,prefix",
    [(VIT, "cls", 1), (VIT, "avg", 1), ("test_vit2", "avg", 1), ("test_vit3", "avg", 1)],
    ids=["cls", "avg", "avg-register-token", "avg-attention-pool-dropped"],
)
def test_pooling_is_the_class_token_or_the_mean_of_the_patch_tokens(backbone, pooling, prefix):
    embedder = create_embedder(backbone, weights="none", head="pooled", pooling=pooling, img_size=32).eval()
    assert embedder.backbone.num_prefix_tokens == prefix and embedder.backbone.attn_pool is None
    x = images()
    with torch.no_grad():
        tokens = embedder.backbone.forward_features(x)
        assert tokens.shape[1] == prefix + 4  # 2 × 2 patches of 16 px
        start = 0 if embedder.backbone.pool_include_prefix else prefix  # test_vit3 was built to pool them
        pooled = tokens[:, 0] if pooling == "cls" else tokens[:, start:].mean(dim=1)
        expected = torch.nn.functional.normalize(embedder.backbone.fc_norm(pooled), dim=1)
        torch.testing.assert_close(embedder(x), expected)


@pytest.mark.parametrize(
    "backbone,pooling,message",
    [
        ("test_vit2", "cls", "test_vit2 has no class token; use pooling avg"),
        (VIT, "gem", "pooling 'gem' pools a CNN's feature map; test_vit is a ViT"),
        ("test_efficientnet", "cls", "pooling 'cls' takes a ViT's class token; test_efficientnet is a CNN"),
    ],
)
def test_a_pooling_the_backbone_cannot_use_is_refused(backbone, pooling, message):
    with pytest.raises(InputError, match=message):
        create_embedder(backbone, weights="none", pooling=pooling)


def test_hub_weights_load_at_another_size_from_the_local_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    saved = timm.create_model(VIT, pretrained=False).state_dict()
    snapshot = tmp_path / "models--timm--test_vit.r160_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in saved.items()}, snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    embedder = create_embedder(VIT, weights="hub", pooling="cls", img_size=64)
    state = embedder.backbone.state_dict()
    assert embedder.config["weights_source"] == "hub"
    assert torch.equal(state["blocks.5.mlp.fc2.weight"], saved["blocks.5.mlp.fc2.weight"])
    resampled = resample_abs_pos_embed(saved["pos_embed"], new_size=(4, 4), old_size=(10, 10), num_prefix_tokens=1)
    torch.testing.assert_close(state["pos_embed"], resampled)  # 160 px → 64 px: 10 × 10 → 4 × 4 patches


def test_layer_decay_scales_each_backbone_layer_below_the_top():
    embedder = create_embedder(VIT, weights="none", pooling="cls", img_size=32)
    assert [g["name"] for g in param_groups(embedder, 1e-3, 0.1, layer_decay=1.0)] == ["head", "backbone"]
    groups = param_groups(embedder, 1e-3, 0.1, layer_decay=0.5)
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1e-3
    lrs = [g["lr"] for g in groups[1:]]
    assert lrs == pytest.approx([1e-4 * 0.5**i for i in range(len(lrs))]) and len(lrs) >= 6  # top down
    assert {id(p) for p in groups[-1]["params"]} >= {id(embedder.backbone.pos_embed), id(embedder.backbone.cls_token)}
    assert any(p is embedder.backbone.blocks[5].mlp.fc2.weight for p in groups[1]["params"])
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in embedder.parameters())  # each parameter exactly once
    optimizer = train.create_optimizer(replace(config.get_config("fixture"), layer_decay=0.5), embedder)
    assert {g.get("weight_decay") for g in optimizer.param_groups} == {1e-4}  # decay as before, every group
    with pytest.raises(InputError, match="layer_decay"):
        param_groups(embedder, 1e-3, 0.1, layer_decay=0.0)


def test_grad_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        embedder = create_embedder(VIT, embed_dim=16, weights="none", pooling="avg", img_size=32).train()
        if checkpointing:
            models.enable_grad_checkpointing(embedder)
        embedder(images(4)).square().sum().backward()
        return {n: p.grad for n, p in embedder.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_a_backbone_without_grad_checkpointing_is_refused(monkeypatch):
    embedder = create_embedder("test_resnet", weights="none")

    def unsupported(enable=True):
        raise AssertionError("gradient checkpointing not supported")

    monkeypatch.setattr(embedder.backbone, "set_grad_checkpointing", unsupported)
    with pytest.raises(InputError, match="test_resnet does not support gradient checkpointing"):
        models.enable_grad_checkpointing(embedder)


# --- end to end ---------------------------------------------------------------------------------


def vit_cfg(**overrides):
    """The fixture recipe on test_vit at 32 px (2 × 2 patches), every new option switched on."""
    values = dict(backbone=VIT, pooling="cls", img_size=32, layer_decay=0.75, grad_checkpointing=True, epochs=2)
    return replace(config.get_config("fixture"), patience=5, num_workers=0, **{**values, **overrides})


@pytest.fixture(scope="module")
def runs(small_tree, tmp_path_factory):
    """A 2-epoch fit, and the same fit interrupted after its first epoch and resumed."""
    root, table = small_tree
    folder = tmp_path_factory.mktemp("vit_runs")
    train.fit(vit_cfg(), table, root, folder / "whole", progress=False)
    assert train.fit(vit_cfg(), table, root, folder / "resumed", progress=False, stop_after_epoch=1) is None
    one_epoch = pd.read_csv(folder / "resumed" / "history.csv")
    train.fit(vit_cfg(), table, root, folder / "resumed", resume=True, progress=False)
    return folder, one_epoch


def test_fit_and_resume_give_the_same_run(runs):
    folder, one_epoch = runs
    assert list(one_epoch.epoch) == [0, 1] and one_epoch.loss[1] > 0
    whole, resumed = (pd.read_csv(folder / name / "history.csv") for name in ("whole", "resumed"))
    timing = ["train_images_per_s"]
    pd.testing.assert_frame_equal(whole.drop(columns=timing), resumed.drop(columns=timing))
    a, b = (checkpoints.read_checkpoint(folder / name / "last.pt")["model"] for name in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = json.loads((folder / "whole" / "config.json").read_text())
    assert recorded["model"]["pooling"] == "cls" and recorded["model"]["img_size"] == 32
    assert recorded["config"]["layer_decay"] == 0.75 and recorded["config"]["grad_checkpointing"] is True


def test_evaluate_index_and_export(runs, small_tree, tmp_path):
    folder, _ = runs
    root, table = small_tree
    run = folder / "whole"
    metrics = train.evaluate_run(run, table, root, progress=False)
    assert metrics["split"] == "test" and 0 <= metrics["recall@5"] <= 1
    embedder, cfg = checkpoints.load_embedder(run / "best.pt")
    assert embedder.tokens and embedder.backbone.global_pool == "token" and cfg.backbone == VIT
    gallery.build_index(run / "best.pt", table, root, tmp_path / "index", progress=False)
    query = pd.read_csv(table).query("split == 'test' and domain == 'consumer'").iloc[0]
    hits = Retriever.load(tmp_path / "index").search(root / query.path, k=3)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    out = tmp_path / "vit.onnx"
    argv = ["export", "--checkpoint", str(run / "best.pt"), "--out", str(out), "--table", str(table)]
    assert main([*argv, "--data-root", str(root)]) == 0
    assert json.loads(out.with_name("vit.onnx.json").read_text())["check"]["min_cosine"] >= 1 - 1e-4


def _ddp_worker(rank: int, world: int, port: int, root: str, table: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        fitted = train.fit(vit_cfg(epochs=1), table, root, out, progress=False)
        weights = checkpoints.read_checkpoint(f"{out}/last.pt")["model"] if rank == 0 else None
        torch.save({"fitted": fitted, "weights": weights}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_fits_a_vit(small_tree, tmp_path, free_port):
    root, table = small_tree
    mp.spawn(_ddp_worker, args=(2, free_port(), str(root), str(table), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["fitted"] == ranks[1]["fitted"] and ranks[0]["fitted"]["best_epoch"] >= 0
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.epoch) == [0, 1] and history.loss[1] > 0
    assert json.loads((tmp_path / "config.json").read_text())["world_size"] == 2


def test_foundation_zero_shot_rows_are_computed_once(small_tree, tmp_path):
    root, table = small_tree
    backbones = (("test_vit", 30, "cls"), ("test_vit2", 32, "avg"))
    rows = final.foundation_zero_shot(config.get_config("fixture"), table, root, tmp_path, backbones, "none", False)
    assert [r["model"] for r in rows] == ["zero-shot test_vit (cls, 32 px)", "zero-shot test_vit2 (avg, 32 px)"]
    assert all(r["result"]["protocol"] == "official" and r["result"]["split"] == "test" for r in rows)
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert sorted(written) == ["zero_shot_test_vit.json", "zero_shot_test_vit2.json"]
    again = final.foundation_zero_shot(config.get_config("fixture"), table, root, tmp_path, backbones, "none", False)
    assert again == rows and {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == written
    assert list(artifacts.comparison_table(rows).index) == [r["model"] for r in rows]
