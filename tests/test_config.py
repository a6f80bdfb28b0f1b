"""config.check: every Config field checked once, by name, through get_config and config_from_dict."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest

from helpers.core import config
from helpers.core.config import Config
from helpers.core.errors import InputError

FIELD_NAMES = [f.name for f in fields(Config)]

# One unusable value per field: a new field without an entry fails test_each_field_rejects_a_bad_value.
BAD_VALUES = {
    "profile": "huge",
    "data_root": "",
    "synthetic_items": 0,
    "synthetic_seed": -1,
    "categories": ("TOPS", ""),
    "sample": (0.1, 0.02),
    "resplit": (8.0, -1.0, 1.0),
    "split_seed": -1,
    "img_size": 0,
    "resize": "crop",
    "box_margin": -0.1,
    "crop": "yes",
    "augment": "extreme",
    "photometric": "sepia",
    "backbone": "",
    "weights": "imagenet",
    "embed_dim": 0,
    "head": "mlp",
    "pooling": "max",
    "loss": "arcface",
    "margin": -0.2,
    "temperature": 0.0,
    "xbm_size": -1,
    "xbm_start_epoch": -1,
    "p_items": 0,
    "k_images": 1,
    "epochs": 0,
    "optimizer": "sgd",
    "lr": float("nan"),
    "backbone_lr_mult": -0.1,
    "layer_decay": 0.0,
    "weight_decay": -1e-4,
    "schedule": "step",
    "warmup_epochs": -1,
    "grad_clip": 0.0,
    "patience": 0,
    "amp": "fp8",
    "seed": -1,
    "deterministic": 1,
    "num_workers": -1,
    "embed_batch": 0,
    "device": "gpu",
    "flip_tta": "no",
    "compile": None,
    "grad_checkpointing": "yes",
    "synthetic_splits": (1, 5, 5),
    "train_fraction": 0.0,
    "stop_items": -1,
    "epoch_images": 0,
}


def _rejection(**values) -> str:
    with pytest.raises(InputError) as caught:
        config.check(replace(config.PROFILES["demo"], **values))
    return str(caught.value)


def test_synthetic_splits_must_sum_to_the_items():
    message = _rejection(synthetic_items=10, synthetic_splits=(4, 3, 2))
    assert "synthetic_splits" in message and "synthetic_items (10)" in message


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_each_field_rejects_a_bad_value_by_name(name):
    message = _rejection(**{name: BAD_VALUES[name]})
    assert re.search(rf"\b{name}\b", message) and "\n" not in message


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": "3"}, "epochs must be an integer, got '3'"),
        ({"img_size": 1.5}, "img_size must be an integer or None, got 1.5"),
        ({"embed_dim": True}, "embed_dim must be an integer, got True"),
        ({"lr": "0.1"}, "lr must be a positive number, got '0.1'"),
        ({"k_images": 1}, "k_images must be at least 2 (one consumer and one shop image), got 1"),
        ({"box_margin": -0.5}, "box_margin must be a non-negative number, got -0.5"),
        ({"loss": "arcface"}, "unknown loss 'arcface'; choose one of: semi_hard, batch_hard, infonce"),
        ({"device": "cuda:x"}, "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
        ({"sample": (0.1, 0.02, 2.0)}, "sample must be None or three non-negative numbers in [0, 1]"),
        ({"resplit": (0, 0, 0)}, "resplit must be None or three non-negative numbers (ratios)"),
        ({"categories": ()}, "categories must be a tuple of category names or None (all), got ()"),
    ],
)
def test_messages_say_what_the_field_must_be(values, message):
    assert message in _rejection(**values)


def test_every_field_has_help_and_one_check():
    assert [name for name in FIELD_NAMES if not Config.__dataclass_fields__[name].metadata.get("help")] == []
    assert sorted(config.CHECKS) == sorted(FIELD_NAMES)
    assert sorted(BAD_VALUES) == sorted(FIELD_NAMES)


def test_field_groups_name_real_fields():
    groups = config.DATA_FIELDS + config.RUNTIME_FIELDS + config.EVALUATION_FIELDS + config.PREPROCESSING_FIELDS
    assert set(groups) <= set(FIELD_NAMES)
    assert set(config.CHOICES) <= set(FIELD_NAMES)


@pytest.mark.parametrize("profile", sorted(config.PROFILES))
def test_profiles_pass_and_survive_a_json_round_trip(profile):
    cfg = config.check(config.PROFILES[profile])
    assert config.config_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg


def test_choice_names_agree_with_the_registries():
    from helpers.data import transforms
    from helpers.modeling import losses, models

    assert config.RESIZE_MODES == transforms.RESIZE_MODES
    assert config.AUGMENT_PRESETS == tuple(transforms.AUGMENT_PRESETS)
    assert config.PHOTOMETRIC_MODES == transforms.PHOTOMETRIC_MODES
    assert config.WEIGHT_SOURCES == models.WEIGHT_SOURCES
    assert config.HEADS == models.HEADS
    assert config.POOLINGS == models.POOLINGS
    assert config.LOSSES == tuple(losses.LOSSES)


def test_get_config_checks_and_normalises_overrides(tmp_path):
    with pytest.raises(InputError, match="img_size must be at least 1, got 0"):
        config.get_config("fixture", img_size=0)
    with pytest.raises(InputError, match="unknown config fields: colour"):
        config.get_config("fixture", colour=None)
    cfg = config.get_config("fixture", sample=[0.5, 0.25, 0.25], data_root=tmp_path, epochs=None)
    assert cfg.sample == (0.5, 0.25, 0.25) and cfg.data_root == str(tmp_path) and cfg.epochs == 1


def test_full_needs_a_data_root(monkeypatch):
    monkeypatch.delenv("C2S_DATA_ROOT", raising=False)
    with pytest.raises(InputError, match="profile 'full' needs the DeepFashion C2S root"):
        config.get_config("full")
    monkeypatch.setenv("C2S_DATA_ROOT", "/data/c2s")
    assert config.get_config("full").data_root == "/data/c2s"
    assert config.get_config("full", data_root=Path("/elsewhere")).data_root == "/elsewhere"


def test_config_from_dict_checks_what_it_reads():
    values = json.loads(json.dumps(asdict(config.PROFILES["fixture"])))
    with pytest.raises(InputError, match="embed_batch must be at least 1, got 0"):
        config.config_from_dict({**values, "embed_batch": 0})
    with pytest.raises(InputError, match="unknown config fields: colour"):
        config.config_from_dict({**values, "colour": "red"})
    with pytest.raises(InputError, match="config lacks its profile"):
        config.config_from_dict({k: v for k, v in values.items() if k != "profile"})
    # a dict written before a field existed: the field takes its default
    assert config.config_from_dict({k: v for k, v in values.items() if k != "compile"}).compile is False


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("inf"), True, "0.75"])
def test_layer_decay_is_a_fraction_up_to_one(value):
    assert "layer_decay must be a number in (0, 1]" in _rejection(layer_decay=value)


def test_new_fields_default_to_training_as_before():
    """Each later field's neutral value is the Config default, the value every run recorded before
    it trained with; the fixture and full profiles keep them all (demo's tree, stop items and epoch
    size are its own)."""
    from helpers.core import identity

    defaults = {f.name: f.default for f in fields(config.Config) if f.name in identity.LATER_FIELDS}
    assert defaults == identity.LATER_FIELDS
    for name in ("fixture", "full"):
        profile = config.PROFILES[name]
        assert {k: getattr(profile, k) for k in identity.LATER_FIELDS} == identity.LATER_FIELDS
    assert config.get_config("fixture", layer_decay=0.75, grad_checkpointing=True).layer_decay == 0.75


def test_a_synthetic_tree_of_another_size_gets_a_folder_of_its_own():
    assert config.get_config("demo").work_dir == config.OUTPUTS / "demo"
    tour = config.get_config("demo", **config.DEMO_TREE["demo"])
    assert tour.work_dir == config.OUTPUTS / "demo_450items" and tour.stop_items == 50
    assert sum(tour.synthetic_splits) == tour.synthetic_items  # the demo's own tree is a valid one
    real = config.get_config("demo", data_root="/data/c2s", **config.DEMO_TREE["demo"])
    assert real.work_dir == config.OUTPUTS / "demo"  # a real tree: its prepared table in the profile's folder
