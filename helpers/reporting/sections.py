"""The paper's generated sections for one ``results/<profile>`` folder (:func:`load_profile`) other
than the results: the method (training settings, statistics, the shared definitions of the
experiment tables and learning curves, where the noise comes from: Section 3), the data (Section 4),
the one-line summaries of Section 5 (:func:`experiment_summary`), the full study's plan for
"Running on DeepFashion" (:func:`deepfashion_lines`) and the appendix on reproducing the numbers. Each is a list of markdown lines whose tables and
figures carry ``{def:tab:x}`` / ``{def:fig:x}`` labels for :func:`helpers.reporting.prose.resolve_labels`.

Figures are saved beside the report (:func:`save_figure`), or copied from where a notebook saved
them under ``results/`` (:func:`copied_figure`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from matplotlib import pyplot

from helpers.core.errors import InputError
from helpers.experiments import study
from helpers.reporting.tables import caption, data_table, hyperparameter_table, md_table, statistics_table


def load_profile(root: Path) -> dict:
    """A ``results/<profile>`` folder's summary and its finished experiments."""
    summary_path = root / "data_summary.json"
    if not summary_path.is_file():
        raise InputError(f"{summary_path}: missing; run `python -m helpers study` first")
    summary = json.loads(summary_path.read_text())
    finished = [
        (e, study.load_experiment(root, e.name))
        for e in study.experiments(summary["profile"])
        if (root / e.name / "decision.json").is_file()
    ]
    return {
        "root": root,
        "summary": summary,
        "profile": summary["profile"],
        "source": summary["data_source"],
        "finished": finished,
    }


# The figures 01_data saves under results/<profile>/data/, with their captions.
DATA_FIGURES = {
    "pairs": "consumer photos (their garment box drawn) beside the shop photos of the same item, items drawn at random",
    "box_geometry": "garment boxes by domain: the share of the photo the box covers and its aspect ratio (width / "
    "height); the gap between the domains is what the crop and the box margin address",
}


def data_lines(loaded: dict, tag: str, figures: Path) -> list[str]:
    summary, profile, source = loaded["summary"], loaded["profile"], loaded["source"]
    lines = [
        f"*{{def:tab:{tag}data}}: the image table `images.csv` (sha256 `{summary['table_sha256'][:12]}…`) per split; "
        f"data: {source}; profile `{profile}`.*",
        "",
        md_table(data_table(summary)),
        "",
    ]
    for name, text in DATA_FIGURES.items():
        lines += copied_figure(
            loaded["root"] / "data" / f"{name}.png",
            figures / f"{profile}_{name}.png",
            name,
            f"*{{def:fig:{tag}{name}}}: {text}; data: {source}.*",
        )
    return lines


def copied_figure(saved: Path, target: Path, alt: str, caption: str) -> list[str]:
    """A figure a notebook saved under results/, copied beside the report and shown with its
    caption; nothing when the notebook has not saved it."""
    if not saved.is_file():
        return []
    target.write_bytes(saved.read_bytes())
    return [f"![{alt}](figures/{target.name})", "", caption, ""]


def final_run_configs(root: Path) -> list[dict]:
    """The recorded ``config.json`` of every run of the final configuration (a study run whose config
    matches ``final_config.json``); before a final configuration exists, the baseline runs."""
    runs = [(p, json.loads(p.read_text())) for p in sorted(root.glob("*/*/config.json"))]
    record = root / "final_config.json"
    if record.is_file():
        chosen = json.loads(record.read_text())["config"]
        return [run for _, run in runs if all(run["config"].get(k) == v for k, v in chosen.items())]
    return [run for path, run in runs if path.parent.name.startswith("baseline_")]


def method_lines(loaded: dict, tag: str) -> list[str]:
    lines = []
    configs = final_run_configs(loaded["root"])
    if configs:
        lines += [
            f"*{{def:tab:{tag}hyperparameters}}: training settings of the final configuration, read from the "
            f"`config.json` of its {len(configs)} recorded runs; profile `{loaded['profile']}`.*",
            "",
            md_table(hyperparameter_table(configs)),
            "",
        ]
    if loaded["finished"]:
        experiment, first = loaded["finished"][0]
        decisions = [result["decision"] for _, result in loaded["finished"]]
        lines += [
            f"*{{def:tab:{tag}statistics}}: evaluation protocol and statistical method, read from each "
            f"experiment's `decision.json`; profile `{loaded['profile']}`.*",
            "",
            md_table(statistics_table(decisions)),
            "",
            "**The experiment tables** of Appendix A share one definition: "
            + caption(first["decision"], loaded["source"], first["comparison"]).strip("*"),
            "",
            "**The learning-curve figures** of Appendix A share one definition: " + curves_caption(first["decision"]),
            "",
            *noise_lines(loaded["root"]),
        ]
    return lines


def noise_lines(root: Path) -> list[str]:
    """One paragraph from ``noise.csv``: the pooled variance components of a Recall@5 difference
    (seed, item, seed × item), their shares at the study's size, and what doubling the seeds or
    the val items would do to the standard error."""
    path = Path(root) / study.NOISE
    if not path.is_file():
        return []
    noise = pd.read_csv(path)
    if f"var_seed_{study.PRIMARY}" not in noise.columns:  # a noise.csv written before the crossed statistics
        return []
    pooled = noise[noise.experiment == "pooled"].iloc[0]
    primary = study.PRIMARY

    def share(part: str) -> str:
        return f"{pooled[f'share_{part}_{primary}']:.2f}"

    return [
        f"**Where the noise comes from** (`{path.parent.name}/{path.name}`). Pooled over every Recall@5 "
        f"comparison of the study (primary and exploratory), at {int(pooled.n_seeds)} seeds and {int(pooled.n_items)} val items "
        f"({int(pooled.n_queries)} queries) the variance of a paired difference splits into shares of "
        f"{share('seed')} from seeds, {share('item')} from items and {share('inter')} from their interaction; "
        f"its standard error "
        f"{pooled[f'se_{primary}']:.4f} would become {pooled[f'se_2x_seeds_{primary}']:.4f} with twice the seeds "
        f"and {pooled[f'se_2x_items_{primary}']:.4f} with twice the val items. Val items only cost evaluation, "
        "seeds cost training runs; `python -m helpers study power` gives the minimum detectable effect of any "
        "seeds × items from these components.",
        "",
    ]


def reproduction_lines(root: Path) -> list[str]:
    """What a rerun of the study must give, from the machines and switches the runs recorded
    (each run's ``config.json``: its config and ``env``), and the commit whose code wrote the results."""
    record = root / "final_config.json"
    commit = json.loads(record.read_text()).get("code_commit") if record.is_file() else None
    head = [f"The study's tables and decisions were written by the code at commit `{commit}`.", ""] if commit else []
    runs = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/config.json"))]
    if not runs:
        return head
    deterministic = all(run["config"].get("deterministic") for run in runs)
    machines = sorted(
        {
            f"`torch {e.get('torch')}`, `timm {e.get('timm')}`, `Python {e.get('python')}` on "
            f"{e.get('device')} with {e.get('cpu_count')} cores"
            for e in (run.get("env", {}) for run in runs)
        }
    )
    if deterministic:
        line = (
            "Every run above was trained with deterministic kernels (`deterministic: true`) and seeded model "
            "initialisation, batches and per-sample augmentation; its `config.json` records the machine and "
            f"library versions: {'; '.join(machines)}. On the same machine kind with the same versions, `make "
            "study` retrains identical runs: **tolerance zero**, every loss and metric equal to all its digits "
            "(a run reused from this study or retrained in another process gives the same `history.csv`). On "
            "another CPU, on a GPU or with other library versions float rounding differs, and so do rankings: "
            "expect differences of the order of the seed-to-seed std shown in each table, not beyond."
        )
    else:
        line = (
            "Some runs above were trained without deterministic kernels, so reruns differ by float rounding "
            "even on the same machine: expect differences of the order of the seed-to-seed std in each table. "
            f"Machines and versions recorded: {'; '.join(machines)}."
        )
    return [*head, line, ""]


def curves_caption(decision: dict) -> str:
    """The definition shared by every learning-curve figure."""
    seeds = ", ".join(map(str, decision["seeds"]))
    return (
        "read from each run's `history.csv`: train loss (left; none at epoch 0, the untrained model) and val "
        f"Recall@5 (right) per epoch. Line: mean over seeds {seeds} (after a seed stopped early, over the seeds "
        "still training); band: lowest to highest seed; dot: the epoch of each run's `best.pt`."
    )


def save_figure(figure, path: Path) -> Path:
    """A PNG without a version stamp, so that a rebuild is byte-identical."""
    figure.savefig(path, dpi=80, metadata={"Software": None})
    pyplot.close(figure)
    return path


# --------------------------------------------------------------------------- running the study on DeepFashion

# The full study's cost is bounded from the one GPU measurement there is, not measured: `bash
# benchmarks/gpu_card.sh` on one H200 (docs/benchmarks.md, "One GPU: the GPU card"; EfficientNet-B3 at
# 288 px, bf16, batch 64): the full training loop and the extraction pass, in images per second.
GPU_CARD = {"device": "one NVIDIA H200", "train_images_per_s": 524, "embed_images_per_s": 471}
# The full profile's data, the original study's sample (TOPS + DRESSES, 10 % of the train items, 2 % of
# val and test): the counts docs/scaling.md estimates from the official lists (no DeepFashion here).
FULL_DATA_ESTIMATE = {"train_items": 1221, "val_images": 850}
# MACs per image counted with torch.utils.flop_counter (docs/scaling.md): DINOv2 ViT-S/14 at 224 px
# against EfficientNet-B3 at 288 px; the ViT's step is bounded by scaling B3's rate down by their ratio.
# Every other backbone (ResNet-34 at its native 224 px) is counted at B3's rate, which is not measured.
GMACS = {"vit_small_patch14_dinov2.lvd142m": 5.51, "efficientnet_b3": 1.59}
NOTEBOOKS = {
    "02_1": "02_preprocessing/02_1_crop_resize_resolution.ipynb",
    "02_2": "02_preprocessing/02_2_augment_margin_photometric_head.ipynb",
    "03": "03_model_experiments/03_models.ipynb",
}


def study_plan(profile: str) -> pd.DataFrame:
    """The study's training runs per stage, counted from the catalogue
    (:func:`helpers.experiments.study.experiments`, each variant as it resolves against the profile's
    recipe) and the seeds (:data:`helpers.core.config.STUDY_SEEDS` for the baselines and primary
    variants, :data:`helpers.core.config.EXPLORATORY_SEEDS` for the exploratory ones). A stage's
    baseline is the earlier stages' winners: shared with the stage before when nothing was adopted
    (``runs_min``), a new configuration when something was (``runs_max``, a new baseline per stage
    after the first). Columns: stage, experiments, variants, runs_min, runs_max; one row per stage."""
    from dataclasses import replace

    from helpers.core import config as settings
    from helpers.experiments import catalogue

    base = settings.PROFILES[profile]
    seeds, exploratory_seeds = settings.STUDY_SEEDS[profile], settings.EXPLORATORY_SEEDS[profile]
    rows = []
    for number, stage in enumerate(study.STAGES):
        experiments = [e for e in study.experiments(profile) if e.stage == stage]
        variants = runs = 0
        for experiment in experiments:
            for name in catalogue.resolve_variants(experiment, replace(base, data_root=base.data_root or "unused")):
                if name != "baseline":
                    variants += 1
                    runs += exploratory_seeds if name in experiment.exploratory else seeds
        rows.append(
            {
                "stage": stage,
                "experiments": len(experiments),
                "variants": variants,
                "runs_min": runs + (seeds if number == 0 else 0),
                "runs_max": runs + seeds,
            }
        )
    return pd.DataFrame(rows)


def study_run_count(profile: str) -> tuple[int, int]:
    """``(fewest, most)`` training runs of the whole study (:func:`study_plan`): variants × seeds
    plus the baselines' runs (one baseline when no stage adopts anything, one per stage at most)."""
    plan = study_plan(profile)
    return int(plan.runs_min.sum()), int(plan.runs_max.sum())


def _run_seconds(cfg, card: dict = GPU_CARD, data: dict = FULL_DATA_ESTIMATE) -> float:
    """An upper bound on one run's GPU seconds: every epoch trained (no early stopping), an epoch's
    P×K batches at the card's training rate and a val pass at its extraction rate, both divided by
    the backbone's MACs over B3's when it has more."""
    slower = max(1.0, GMACS.get(cfg.backbone, GMACS["efficientnet_b3"]) / GMACS["efficientnet_b3"])
    batch = cfg.p_items * cfg.k_images
    images = cfg.epoch_images or data["train_items"] // cfg.p_items * batch
    epoch = images / (card["train_images_per_s"] / slower) + data["val_images"] / (card["embed_images_per_s"] / slower)
    return cfg.epochs * epoch


def study_gpu_hours(profile: str = "full") -> pd.DataFrame:
    """Per stage of :func:`study_plan`: the runs (most) and an upper bound on their GPU-hours at the
    GPU card's measured rate (:data:`GPU_CARD`, :data:`FULL_DATA_ESTIMATE`): an estimate from measured
    throughput on one H200, not measured on Colab or on DeepFashion."""
    from dataclasses import replace

    from helpers.core import config as settings
    from helpers.experiments import catalogue

    base = replace(settings.PROFILES[profile], data_root=settings.PROFILES[profile].data_root or "unused")
    seeds, exploratory_seeds = settings.STUDY_SEEDS[profile], settings.EXPLORATORY_SEEDS[profile]
    plan = study_plan(profile).set_index("stage")
    hours = {}
    for stage in study.STAGES:
        seconds = seeds * _run_seconds(base)  # the stage's own baseline (the most: a new one per stage)
        for experiment in (e for e in study.experiments(profile) if e.stage == stage):
            for name, cfg in catalogue.resolve_variants(experiment, base).items():
                if name != "baseline":
                    n = exploratory_seeds if name in experiment.exploratory else seeds
                    seconds += n * _run_seconds(cfg)
        hours[stage] = seconds / 3600
    plan["gpu_hours_max"] = pd.Series(hours)
    return plan.reset_index()


def deepfashion_lines(profile: str = "full") -> list[str]:
    """The generated half of "Running on DeepFashion": the full study's runs per notebook
    (:func:`study_plan`) and its GPU-hours bounded from the measured throughput (:func:`study_gpu_hours`)."""
    from helpers.core import config as settings

    plan = study_gpu_hours(profile)
    fewest, most = study_run_count(profile)
    cfg = settings.PROFILES[profile]
    table = pd.DataFrame(
        {
            "notebook": [f"`{NOTEBOOKS[s]}`" for s in plan.stage],
            "stage": [f"`{s}`" for s in plan.stage],
            "experiments": plan.experiments,
            "variants": plan.variants,
            "training runs": [f"{a}" if a == b else f"{a}–{b}" for a, b in zip(plan.runs_min, plan.runs_max)],
            "GPU-hours, at most (estimate)": [f"≤ {h:.1f}" for h in plan.gpu_hours_max],
        }
    )
    total = pd.DataFrame(
        [
            {
                "notebook": "the study",
                "stage": "all",
                "experiments": int(plan.experiments.sum()),
                "variants": int(plan.variants.sum()),
                "training runs": f"{fewest}–{most}",
                "GPU-hours, at most (estimate)": f"≤ {plan.gpu_hours_max.sum():.1f}",
            }
        ]
    )
    data = FULL_DATA_ESTIMATE
    return [
        f"*{{def:tab:deepfashion_plan}}: the `{profile}` study per notebook: experiments, variants and training "
        f"runs counted from the catalogue ({settings.STUDY_SEEDS[profile]} seeds per baseline and primary variant, "
        f"{settings.EXPLORATORY_SEEDS[profile]} per exploratory one; fewest: no stage adopts anything, so one "
        "baseline serves all; most: a new baseline per stage), and GPU-hours bounded from measured throughput, "
        f"not measured on Colab: every run trains all {cfg.epochs} epochs (early stopping, patience "
        f"{cfg.patience}, only shortens it) of about {data['train_items']} train items in P×K = "
        f"{cfg.p_items}×{cfg.k_images} batches plus a val pass of about {data['val_images']} images, at the rates "
        f"`bash benchmarks/gpu_card.sh` measured on {GPU_CARD['device']} (`docs/benchmarks.md`: "
        f"{GPU_CARD['train_images_per_s']} training and {GPU_CARD['embed_images_per_s']} extraction images/s, "
        "EfficientNet-B3 at 288 px, batch 64), DINOv2 ViT-S/14 slowed by its MACs over B3's "
        f"({GMACS['vit_small_patch14_dinov2.lvd142m']} / {GMACS['efficientnet_b3']} GMACs). `01_data` and "
        "`04_demo` train nothing (`04_demo` evaluates the study's runs once: minutes).*",
        "",
        md_table(pd.concat([table, total], ignore_index=True)),
        "",
    ]


def effect_cells(comparison: pd.DataFrame) -> list[str]:
    """Each compared variant of an experiment's ``comparison.csv`` as ``variant verdict, difference
    [interval]`` in val Recall@5: a primary test's interval at the level of its Holm step, an
    exploratory one's uncorrected 95 % interval, labelled (as
    :func:`helpers.experiments.family.effects` reads them)."""
    primary, cells = study.PRIMARY, []
    for variant, row in comparison.iterrows():
        if row.get(f"verdict_{primary}") == "baseline" or pd.isna(row.get(f"diff_{primary}")):
            continue
        adjusted = row.get(f"role_{primary}", "primary") == "primary" and pd.notna(row.get(f"low_adj_{primary}"))
        infix, label = ("_adj", "at Holm's level") if adjusted else ("", "exploratory, uncorrected 95 %")
        cells.append(
            f"`{variant}` {row[f'verdict_{primary}']}, {row[f'diff_{primary}']:+.3f} "
            f"[{row[f'low{infix}_{primary}']:+.3f}, {row[f'high{infix}_{primary}']:+.3f}] ({label})"
        )
    return cells


def experiment_summary(loaded: dict, experiment, result: dict | None, tag: str) -> str:
    """One line of Section 5 per experiment (``experiment``: a catalogue Experiment, or the name
    of the post-processing experiment): its verdicts on val Recall@5, what was adopted, and where
    Appendix A has its table, differences and learning curves."""
    name = experiment if isinstance(experiment, str) else experiment.name
    if result is None:
        return f"- `{name}` ({experiment.question}): not run yet."
    decision = result["decision"]
    label = f"{tag}{name}"
    curves = "" if name == study.POSTPROCESS else f", {{fig:{label}_curves}}"
    cells = "; ".join(effect_cells(result["comparison"])) or "no variant compared"
    return (
        f"- `{name}` ({decision['question']}): {cells}; adopted: {decision['winner']} "
        f"(Appendix A: {{tab:{label}}}, {{fig:{label}}}{curves})."
    )
