"""The CLI's flags come from Config and AnnParams; the parser builds without torch; prepare's
defaults are the profile's; the renamed protocol still works. Fast: no model is built here."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from helpers.apps import cli
from helpers.apps.cli import build_parser, main
from helpers.core import config
from helpers.evaluation.ann import AnnParams


def _help(*command: str, capsys) -> str:
    assert main([*command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_train_has_a_flag_for_every_field_but_the_data_ones(capsys):
    assert config.DATA_FIELDS == (
        "data_root",
        "synthetic_items",
        "synthetic_splits",
        "synthetic_seed",
        "categories",
        "sample",
        "resplit",
        "split_seed",
    )
    text = _help("train", capsys=capsys)
    expected = [f.name for f in fields(config.Config) if f.name != "profile" and f.name not in config.DATA_FIELDS]
    assert len(expected) == len(fields(config.Config)) - 9
    assert [name for name in expected if f"{_flag(name)} " not in text] == []
    assert "--split-seed" not in text and "--categories" not in text
    # each with its help and its default per profile
    assert "DataLoader workers; None: 0 on <= 2 cores, else cores - 1 (max 8); default None (fixture 0)" in text
    assert "--deterministic, --no-deterministic deterministic kernels" in text and "default True (full False)" in text
    assert "--optimizer {adamw,adam}" in text and "--head {bn,bnneck,pooled}" in text


def test_train_flags_override_only_what_is_given():
    args = build_parser().parse_args(
        ["train", "--table", "t.csv", "--data-root", "root", "--out", "run", "--profile", "fixture"]
        + ["--lr", "0.01", "--no-crop", "--img-size", "96", "--loss", "infonce"]
    )
    cfg = cli._config(args, cli.TRAIN_FIELDS)
    assert (cfg.lr, cfg.crop, cfg.img_size, cfg.loss) == (0.01, False, 96, "infonce")
    assert cfg == config.get_config("fixture", data_root="root", lr=0.01, crop=False, img_size=96, loss="infonce")


def test_a_bad_config_flag_is_one_line_naming_the_field(tmp_path, capsys):
    common = ["--table", str(tmp_path / "t.csv"), "--data-root", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main(["train", *common, "--profile", "fixture", "--epochs", "0"]) == 2
    assert main(["train", *common, "--box-margin", "-0.5"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: epochs must be at least 1, got 0",
        "error: box_margin must be a non-negative number, got -0.5",
    ]


def test_evaluate_flags_are_the_runtime_and_zero_shot_preprocessing_fields(capsys):
    text = _help("evaluate", capsys=capsys)
    for name in (*config.EVALUATION_FIELDS, *config.PREPROCESSING_FIELDS):
        assert f"{_flag(name)} " in text
    assert "--epochs" not in text and "--loss" not in text


def test_evaluate_refuses_zero_shot_flags_with_a_checkpoint(tmp_path, capsys):
    common = ["evaluate", "--table", str(tmp_path / "t.csv"), "--data-root", str(tmp_path)]
    assert main([*common, "--checkpoint", str(tmp_path / "best.pt"), "--resize", "squash"]) == 2
    assert capsys.readouterr().err == (
        "error: --resize is for a zero-shot evaluation (--backbone): a checkpoint brings its own\n"
    )


def test_index_has_a_flag_per_ann_field_with_its_default(capsys):
    text = _help("index", capsys=capsys)
    for field in fields(AnnParams):
        assert f"{_flag(cli.ANN_FLAG_NAMES.get(field.name, field.name))} " in text
        assert field.metadata["help"] in text
    assert "--nprobe NPROBE IVF lists scanned per query; default 16" in text
    assert "--kind {exact,ivf_flat,ivf_pq,hnsw}" in text
    common = ["index", "--table", "t.csv", "--data-root", "root", "--checkpoint", "best.pt", "--out", "index"]
    assert cli._ann_params(build_parser().parse_args(common)) == AnnParams()
    args = build_parser().parse_args([*common, "--kind", "hnsw", "--hnsw-m", "8", "--ann-seed", "3", "--nlist", "4"])
    assert cli._ann_params(args) == AnnParams("hnsw", nlist=4, hnsw_m=8, seed=3)


@pytest.fixture
def prepared_with(monkeypatch):
    """What cmd_prepare hands to sampling.prepare, without reading any data."""
    from helpers.data import sampling

    calls = []

    def record(data_root, out, **options):
        calls.append(options)
        return dict.fromkeys(("splits", "categories", "dropped_rows", "image_check", "images"))

    monkeypatch.setattr(sampling, "prepare", record)

    def run(*flags: str) -> dict:
        assert main(["prepare", "--data-root", "root", "--out", "out", *flags]) == 0
        return {k: calls[-1][k] for k in ("categories", "sample", "resplit", "seed")}

    return run


def test_prepare_defaults_are_the_profile_s(prepared_with, capsys):
    assert prepared_with() == {
        "categories": ("TOPS", "DRESSES"),
        "sample": (0.1, 0.02, 0.02),
        "resplit": None,
        "seed": 42,
    }
    assert prepared_with("--profile", "demo") == {"categories": None, "sample": None, "resplit": None, "seed": 42}
    assert prepared_with("--categories", "all", "--sample", "all", "--seed", "7") == {
        "categories": None,
        "sample": (1.0, 1.0, 1.0),
        "resplit": None,
        "seed": 7,
    }
    assert prepared_with("--resplit", "8,1,1")["sample"] is None
    text = _help("prepare", capsys=capsys)
    assert "default TOPS,DRESSES (fixture all, demo all)" in text and "default 0.1,0.02,0.02" in text
    assert "seed study" not in text and "default 42" in text


def test_prepare_checks_its_values_as_config_fields(capsys):
    assert main(["prepare", "--data-root", "root", "--out", "out", "--seed", "-1"]) == 2
    assert main(["prepare", "--data-root", "root", "--out", "out", "--sample", "0.1,0.1", "--resplit", "8,1,1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: split_seed must be at least 0, got -1",
        "error: choose either --sample or --resplit, not both",
    ]


def test_protocol_choices_and_the_old_name(capsys):
    common = ["evaluate", "--table", "t.csv", "--data-root", "root", "--backbone", "resnet18"]
    assert build_parser().parse_args(common).protocol == "official"
    assert build_parser().parse_args([*common, "--protocol", "original_pairs"]).protocol == "original_pairs"
    assert capsys.readouterr().err == ""
    assert build_parser().parse_args([*common, "--protocol", "seed_pairs"]).protocol == "original_pairs"
    assert capsys.readouterr().err == "note: protocol 'seed_pairs' is now called 'original_pairs'\n"
    assert main([*common, "--protocol", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_protocol_choices_are_the_metrics_protocols():
    from helpers.evaluation import metrics

    assert cli.PROTOCOLS == tuple(metrics.PROTOCOLS) and cli.RENAMED_PROTOCOLS == metrics.RENAMED_PROTOCOLS
    assert set(cli.RENAMED_PROTOCOLS.values()) <= set(cli.PROTOCOLS) and set(cli.INDEX_PROTOCOLS) < set(cli.PROTOCOLS)


def test_building_the_parser_imports_neither_torch_nor_pandas():
    code = (
        "import sys\nfrom helpers.apps.cli import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'pandas', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_study_help_gives_each_profile_s_seed_count(capsys):
    from helpers.experiments import study

    text = _help("study", capsys=capsys)
    for profile in config.PROFILES:
        assert f"{profile} {study.n_seeds_for(profile, None)}" in text


def test_study_runs_each_chosen_experiment_and_says_where_results_are(monkeypatch, capsys):
    from helpers.experiments import study

    ran = []

    def run_experiment(self, experiment, train=True, on_run=None):
        ran.append((experiment.name, on_run is not None))
        return {}

    monkeypatch.setattr(study.Study, "run_experiment", run_experiment)
    monkeypatch.setattr(study, "learned", lambda result: "learned")
    assert main(["study", "crop", "--profile", "fixture", "--quiet"]) == 0
    assert ran == [("crop", True)]  # synthetic: each finished run is offered to the robustness store
    from helpers.core.files import portable_path
    from helpers.experiments import artifacts

    where = portable_path(artifacts.results_root("fixture"))
    assert capsys.readouterr().out.splitlines()[-1] == f"results in {where}"


def test_a_run_robustness_cannot_evaluate_is_said_and_the_study_goes_on(monkeypatch, capsys, tmp_path):
    from helpers.apps import cli
    from helpers.experiments import robustness_study
    from helpers.experiments.study import Study

    said = {tmp_path / "crop" / "a": "its ranks at every strength are stored", tmp_path / "crop" / "b": None}
    said[tmp_path / "crop" / "c"] = "not stored: c: no best.pt and no stored ranks at clutter 0.0"
    monkeypatch.setattr(robustness_study, "store_while_checkpoint_exists", lambda study, run_dir: said[run_dir])
    for run in ("a", "b", "c"):  # b: a run no contrast reads, nothing said
        cli._store_robustness(Study("fixture", root=tmp_path), tmp_path / "crop" / run)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("crop/a: its ranks at every strength are stored")
    assert lines[1].endswith("crop/c: not stored: c: no best.pt and no stored ranks at clutter 0.0")


def test_study_postprocess_runs_on_the_final_configuration(monkeypatch, capsys):
    import pandas as pd

    from helpers.experiments import postprocessing

    comparison = pd.DataFrame(
        {
            "n_seeds": [2, 2],
            "val_recall@5_mean": [0.5, 0.625],
            "diff_recall@5": [float("nan"), 0.125],
            "low_adj_recall@5": [float("nan"), -0.25],
            "high_adj_recall@5": [float("nan"), 0.5],
            "p_holm_recall@5": [float("nan"), 0.5],
            "verdict_recall@5": ["baseline", "within noise"],
        },
        index=["none", "aqe"],
    )
    called = []
    monkeypatch.setattr(
        postprocessing,
        "run_postprocess",
        lambda study: (
            called.append(study.profile)
            or {"comparison": comparison, "decision": {"experiment": "postprocess", "winner": "none"}}
        ),
    )
    assert main(["study", "postprocess", "--profile", "fixture", "--quiet"]) == 0
    assert called == ["fixture"]
    out = capsys.readouterr().out
    assert out.startswith("postprocess (none val R@5 0.500, 2 seeds): aqe: +0.125 val R@5 [-0.250, +0.500] at Holm's")
    assert out.rstrip().endswith("Adopted: none.")


def test_runtime_choices_are_the_gallery_runtimes_and_torch_is_the_default():
    from helpers.evaluation import gallery

    assert cli.RUNTIMES == gallery.RUNTIMES
    index = ["index", "--table", "t.csv", "--data-root", "root", "--checkpoint", "best.pt", "--out", "index"]
    for argv in (index, ["search", "--index", "ix", "photo.jpg"], ["serve", "--index", "ix"]):
        assert build_parser().parse_args(argv).runtime == "torch"
        assert build_parser().parse_args([*argv, "--runtime", "onnx"]).runtime == "onnx"


def test_index_refuses_an_onnx_model_without_the_onnx_runtime(capsys):
    common = ["index", "--table", "t.csv", "--data-root", "root", "--checkpoint", "best.pt", "--out", "index"]
    assert main([*common, "--onnx", "model.onnx"]) == 2
    assert capsys.readouterr().err == "error: --onnx is the model of --runtime onnx: add --runtime onnx\n"


def test_export_needs_its_checkpoint_out_and_check_images(capsys):
    assert main(["export", "--checkpoint", "best.pt", "--out", "model.onnx"]) == 2
    assert "the following arguments are required: --table, --data-root" in capsys.readouterr().err
    text = _help("export", capsys=capsys)
    assert "--check-images CHECK_IMAGES" in text and "checked with onnxruntime" in _help(capsys=capsys)
