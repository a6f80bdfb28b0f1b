"""helpers.experiments.catalogue: the experiments of each profile, their variants as valid configs,
the ones equal to the baseline dropped, and the demo grid's sizes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helpers.core import config
from helpers.experiments import catalogue


@pytest.mark.parametrize("profile", ["fixture", "demo", "full"])
def test_experiments_of_a_stage_change_disjoint_fields(profile):
    for stage in catalogue.STAGES:
        fields = [e.fields for e in catalogue.experiments(profile) if e.stage == stage]
        assert sum(len(f) for f in fields) == len(set().union(*fields)), stage
    names = [e.name for e in catalogue.experiments(profile)]
    assert len(names) == len(set(names)) == (10 if profile == "full" else 13)
    assert list(catalogue.planned_tests(profile)) == names  # running order


def test_demo_asks_every_question_with_eight_primary_tests():
    """The original study's questions all run on demo; 8 primary tests (the family the power plan
    sizes), every other variant exploratory, and each question's exploratory levels its own."""
    experiments = {e.name: e for e in catalogue.experiments("demo")}
    assert sum(catalogue.planned_tests("demo").values()) == 8
    for e in experiments.values():
        assert set(e.exploratory) <= set(e.variants) and set(e.primary) | set(e.exploratory) == set(e.variants)
    sizes = {o["embed_dim"] for o in experiments["embed_dim"].variants.values()}
    losses = {o["loss"] for o in experiments["loss"].variants.values()}
    presets = {o["augment"] for o in experiments["augment"].variants.values()}
    assert (
        sizes == {128, 512} and losses == {"semi_hard", "infonce"} and presets == {"medium", "strong", "super_strong"}
    )
    batch = experiments["batch"].variants.values()
    assert {o["p_items"] * o["k_images"] for o in batch} == {32}  # the batch size stays, its composition changes
    assert {o["epoch_images"] for o in batch} == {config.PROFILES["demo"].epoch_images}
    assert experiments["length"].exploratory and experiments["data_size"].exploratory


def test_every_variant_is_a_valid_config():
    for profile in ("fixture", "demo"):
        base = config.get_config(profile)
        for experiment in catalogue.experiments(profile):
            catalogue.resolve_variants(experiment, base)  # check() raises on a bad value


def test_variant_equal_to_the_baseline_is_dropped():
    experiment = catalogue.get_experiment("demo", "augment")
    base = config.get_config("demo")
    assert base.augment == "flip"  # the default recipe's: the preset asked about is a variant
    ladder = ["augment=medium", "augment=strong", "augment=super_strong"]
    assert list(catalogue.resolve_variants(experiment, base)) == ["baseline", *ladder]
    medium = replace(base, augment="medium")
    assert list(catalogue.resolve_variants(experiment, medium)) == ["baseline", *ladder[1:]]
    ladder = catalogue.get_experiment("fixture", "augment")  # weak (the fixture's own) and strong
    configs = catalogue.resolve_variants(ladder, config.get_config("fixture"))
    assert list(configs) == ["baseline", "augment=strong"]
    assert catalogue.changed_fields(configs) == ["augment"]


def test_demo_budget_and_backbones():
    """The demo study: at least 3 seeds, the resolution bracketing the default recipe's from both sides,
    and backbones with packaged weights."""
    from helpers.modeling import models

    assert config.STUDY_SEEDS["demo"] >= 3
    sides = [o["img_size"] for o in catalogue.get_experiment("demo", "resolution").variants.values()]
    assert min(sides) < config.PROFILES["demo"].img_size < max(sides)
    backbones = catalogue.get_experiment("demo", "backbone").variants
    for overrides in backbones.values():
        assert overrides["backbone"] in models.PACKAGED_WEIGHTS and overrides["weights"] == "packaged"
    full = catalogue.get_experiment("full", "backbone").variants
    assert {o["backbone"] for o in full.values()} == {"resnet34", "efficientnet_b3", "vit_small_patch14_dinov2.lvd142m"}
    # the CNNs at their native resolution; the foundation ViT at 224 px, not its 518 px pretraining size
    assert all(o["img_size"] is None for n, o in full.items() if "vit" not in n)


def test_earlier_and_select():
    assert [e.name for e in catalogue.earlier("demo", "02_2")] == ["crop", "resize", "resolution"]
    assert catalogue.earlier("demo", "02_1") == []
    assert [e.name for e in catalogue.select("demo", "03")] == [
        "loss",
        "embed_dim",
        "backbone",
        "batch",
        "length",
        "data_size",
    ]
    assert len(catalogue.select("demo", "all")) == 13
    with pytest.raises(Exception, match="unknown experiment 'nope'"):
        catalogue.select("demo", "nope")


def test_demo_backbones_load_their_packaged_weights():
    """The demo backbone experiment runs offline: each backbone's ImageNet weights come from its package."""
    from helpers.modeling import models

    for overrides in catalogue.get_experiment("demo", "backbone").variants.values():
        embedder = models.create_embedder(overrides["backbone"], 8, weights=overrides["weights"], img_size=64)
        assert embedder.config["weights_source"] == "packaged"


def test_crop_false_feeds_the_whole_photo():
    """The `crop` experiment's field: crop=False ignores the box (and its margin) everywhere."""
    import torch
    from PIL import Image

    from helpers.data import transforms

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    box = (0, 0, 20, 20)  # the red half
    data_config = {"input_size": [3, 16, 16], "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bilinear"}
    cropped = transforms.create_transform(config.get_config("fixture"), data_config)(image, box)
    whole = transforms.create_transform(config.get_config("fixture", crop=False, box_margin=0.2), data_config)
    assert torch.allclose(cropped[:, 8, 8], torch.tensor([1.0, 0.0, 0.0]))  # the crop is all red
    assert torch.equal(whole(image, box), whole(image, None))  # the box is ignored
    assert whole(image, box)[2].max() == 1.0  # the blue half is in the picture
