"""The paper's generated sections for one ``results/<profile>`` folder (:func:`load_profile`) other
than the results: the data (Section 2), the method (training settings, statistics, the shared
definitions of the experiment tables and learning curves, where the noise comes from: Section 3)
and the appendix on reproducing the numbers. Each is a list of markdown lines whose tables and
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
            "**The experiment tables** of Section 4 share one definition: "
            + caption(first["decision"], loaded["source"], first["comparison"]).strip("*"),
            "",
            "**The learning-curve figures** of Section 4 share one definition: " + curves_caption(first["decision"]),
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
        f"**Where the noise comes from** (`{path.parent.name}/{path.name}`). Pooled over the study's "
        f"{len(noise) - 1} Recall@5 comparisons, at {int(pooled.n_seeds)} seeds and {int(pooled.n_items)} val items "
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
