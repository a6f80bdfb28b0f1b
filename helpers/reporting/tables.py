"""The report's tables, from the files under ``results/<profile>/``: each experiment's comparison
(with Holm's correction when the decision used it) and its caption, the data, the training
settings, the statistical method, the test rows; and the markdown table they print as.

Every number is read from a result file and formatted, never computed anew
(:func:`helpers.reporting.check.untraceable_numbers` holds the report to that), and every table
says its protocol, split, data source, profile and seeds.
"""

from __future__ import annotations

import pandas as pd

from helpers.experiments import study

VAL_PROTOCOL = (
    "official protocol on val: queries = unique val consumer images, gallery = unique val shop images "
    "(model selection never sees test)"
)


# --------------------------------------------------------------------------- formatting


def md_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (index dropped; cells as strings)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def mean_std(mean: float, std: float) -> str:
    """``0.376 ± 0.012``; one seed has no spread: ``0.376``."""
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"


def difference(diff: float, low: float, high: float, verdict: str) -> str:
    """``+0.012 [-0.010, +0.034] within noise``; the baseline row: ``baseline``."""
    if pd.isna(diff):
        return verdict
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}] {verdict}"


def with_ci(result: dict, metric: str) -> str:
    ci = result.get(f"{metric}_ci")
    return f"{result[metric]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


# --------------------------------------------------------------------------- tables


def _label(variant: str, decision: dict) -> str:
    if variant != "baseline":
        return variant
    return "baseline (" + ", ".join(f"{k}={v}" for k, v in decision["baseline"].items()) + ")"


def experiment_table(comparison: pd.DataFrame, decision: dict) -> pd.DataFrame:
    """Per variant: seeds, val Recall@1/5/10 mean ± std, paired differences with intervals and
    verdicts against the experiment's own baseline (Holm-corrected for Recall@5 when the table
    has the correction: :func:`holm_table`)."""
    if f"p_holm_{study.PRIMARY}" in comparison.columns:
        return holm_table(comparison, decision)
    rows = []
    for variant, row in comparison.iterrows():
        rows.append(
            {
                "variant": _label(variant, decision),
                "seeds": int(row.n_seeds),
                **{f"R@{k}": mean_std(row[f"val_recall@{k}_mean"], row[f"val_recall@{k}_std"]) for k in study.KS},
                **{
                    f"ΔR@{k} [{decision['ci_percent']} % CI]": difference(
                        row[f"diff_recall@{k}"],
                        row[f"low_recall@{k}"],
                        row[f"high_recall@{k}"],
                        row[f"verdict_recall@{k}"],
                    )
                    for k in study.KS
                },
            }
        )
    return pd.DataFrame(rows)


def _interval(diff: float, low: float, high: float, label: str) -> str:
    """``+0.012 [-0.010, +0.034]``; a row without a difference: its label (``baseline``, ``no pairs``)."""
    return label if pd.isna(diff) else f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"


def holm_table(comparison: pd.DataFrame, decision: dict) -> pd.DataFrame:
    """:func:`experiment_table` of a table with Holm's correction: Recall@5's raw interval, its
    interval at Holm's level and verdict, raw and Holm p-values, the minimum detectable effect at
    0.05 and at Holm's strictest level, as the decision used them, and Holm over the whole family
    once every experiment has finished; Recall@1 and @10 with raw intervals, exploratory."""
    primary, percent, final = study.PRIMARY, decision["ci_percent"], f"p_holm_final_{study.PRIMARY}"
    rows = []
    for variant, row in comparison.iterrows():
        label, tested = row[f"verdict_{primary}"], not pd.isna(row[f"p_{primary}"])
        rows.append(
            {
                "variant": _label(variant, decision),
                "seeds": int(row.n_seeds),
                **{f"R@{k}": mean_std(row[f"val_recall@{k}_mean"], row[f"val_recall@{k}_std"]) for k in study.KS},
                f"ΔR@5 [{percent} % CI]": _interval(
                    row[f"diff_{primary}"], row[f"low_{primary}"], row[f"high_{primary}"], label
                ),
                "ΔR@5 [Holm CI]": difference(
                    row[f"diff_{primary}"], row[f"low_adj_{primary}"], row[f"high_adj_{primary}"], label
                ),
                "p / Holm p": f"{row[f'p_{primary}']:.4f} / {row[f'p_holm_{primary}']:.4f}" if tested else "—",
                "MDE R@5 (0.05 / Holm)": f"{row[f'mde_{primary}']:.3f} / {row[f'mde_holm_{primary}']:.3f}"
                if tested
                else "—",
                **(
                    {"Holm p, whole family": f"{row[final]:.4f} {row[f'verdict_final_{primary}']}" if tested else "—"}
                    if final in comparison.columns
                    else {}
                ),
                **{
                    f"ΔR@{k} [{percent} % CI, exploratory]": difference(
                        row[f"diff_recall@{k}"],
                        row[f"low_recall@{k}"],
                        row[f"high_recall@{k}"],
                        row[f"verdict_recall@{k}"],
                    )
                    for k in study.KS
                    if f"recall@{k}" != primary
                },
            }
        )
    return pd.DataFrame(rows)


TEST_METHOD = (
    "Δ = variant − baseline, paired by seed and query; its variance from seeds and val items as crossed "
    "random effects (seed, item, seed × item, method of moments), t intervals and p-values with "
    "small-sample degrees of freedom"
)


def caption(decision: dict, data_source: str, comparison: pd.DataFrame | None = None) -> str:
    """The table's caption: the test, Holm's correction as the decision used it, and the whole
    family's column when ``comparison`` has one (a decision written before Holm's correction: its
    own bootstrap, described as it was made)."""
    seeds = ", ".join(map(str, decision["seeds"]))
    if "family" not in decision:
        return (
            f"*{VAL_PROTOCOL}; split val; data: {data_source}; profile `{decision['profile']}`; seeds {seeds}. "
            f"Mean ± sample std over seeds; Δ = variant − baseline, paired by seed and query, "
            f"{decision['ci_percent']} % percentile bootstrap resampling seeds and queries together "
            f"(n_boot {decision['n_boot']}); verdict `better` / `worse` when the interval excludes 0.*"
        )
    family = decision["family"]
    final = f"holm_m_final_{study.PRIMARY}"
    sizes = comparison[final].dropna() if comparison is not None and final in comparison.columns else []
    return (
        f"*{VAL_PROTOCOL}; split val; data: {data_source}; profile `{decision['profile']}`; seeds {seeds}. "
        f"Mean ± sample std over seeds; {TEST_METHOD}. Recall@5 decides, Holm-corrected at decision time over "
        "m Recall@5 tests (m = the experiment's own tests, the earlier experiments' finished ones and every planned "
        "test not run yet, counted as p = 1, which only makes the correction stricter): the Holm CI is the interval "
        "at the level Holm's step-down gives the test (after the step-down stops, the stopping step's level), the "
        f"verdict `better` / `worse` when it excludes 0 and Holm p < {family['alpha']}; MDE: the difference detected "
        f"with power {family['power']} at level {family['alpha']} and at Holm's strictest level {family['alpha']} / m."
        + (
            f" Whole family: Holm over all {int(sizes.iloc[0])} Recall@5 tests of the finished study, never above "
            "the decision's Holm p."
            if len(sizes)
            else ""
        )
        + f" Recall@1 and Recall@10 are exploratory: raw {decision['ci_percent']} % intervals, no correction.*"
    )


def data_table(summary: dict) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "split": split,
                "items": v["items"],
                "consumer images": v["consumer_images"],
                "shop images": v["shop_images"],
                "consumer × shop pairs": v["pairs"],
            }
            for split, v in summary["splits"].items()
        ]
    )


def final_rows(final: dict, data_source: str, profile: str) -> pd.DataFrame:
    """The final configuration's test rows (every protocol) and the original study's published row."""
    rows = [
        {
            "model": "final configuration (this study)",
            "protocol": protocol,
            "split": "test",
            "data": data_source,
            "profile": profile,
            **{m: with_ci(result, m) for m in ("recall@1", "recall@5", "recall@10")},
            "queries": result["n_queries"],
            "gallery": result["n_gallery"],
        }
        for protocol, result in final["protocols"].items()
    ]
    original = final.get("original_published")
    if original:
        rows.append(
            {
                "model": original["model"],
                "protocol": original["protocol"],
                "split": "test",
                "data": original["data"],
                "profile": "—",
                **{m: f"{original[m]:.4f}" for m in ("recall@1", "recall@5", "recall@10")},
                "queries": "—",
                "gallery": "—",
            }
        )
    return pd.DataFrame(rows)


def hyperparameter_table(configs: list[dict]) -> pd.DataFrame:
    """Every training setting of the final configuration's runs, as their ``config.json`` recorded it."""
    c = configs[0]["config"]
    loss = f"{c['loss']}, " + (f"temperature {c['temperature']}" if c["loss"] == "infonce" else f"margin {c['margin']}")
    schedule = c["schedule"] + (f", {c['warmup_epochs']} warm-up epochs" if c.get("warmup_epochs") else "")
    rows = {
        "backbone": c["backbone"],
        "weights": c["weights"],
        "input size": f"{c['img_size']} px square",
        "resize": c["resize"],
        "crop to the garment box": f"{c['crop']}, box margin {c['box_margin']}",
        "augment": c["augment"],
        "photometric": c["photometric"],
        "batch: P items × K images": f"{c['p_items']} × {c['k_images']}",
        "loss": loss,
        "optimizer": c["optimizer"],
        "learning rate": c["lr"],
        "backbone lr multiplier": c["backbone_lr_mult"],
        "weight decay": c["weight_decay"],
        "schedule": schedule,
        "gradient clip (norm)": c["grad_clip"],
        "epochs (at most)": c["epochs"],
        "early-stopping patience (epochs)": c["patience"],
        "embedding dim": c["embed_dim"],
        "head": f"{c['head']}, {c['pooling']} pooling, L2-normalised",
        "seeds": ", ".join(str(s) for s in sorted({run["config"]["seed"] for run in configs})),
        "deterministic kernels": c["deterministic"],
    }
    return pd.DataFrame([{"setting": k, "value": v} for k, v in rows.items()])


def statistics_table(decisions: list[dict]) -> pd.DataFrame:
    """The evaluation protocol and statistical method the decisions recorded."""

    def values(read) -> str:
        return ", ".join(dict.fromkeys(str(read(d)) for d in decisions))

    holm = [d["family"] for d in decisions if "family" in d]
    rows = {
        "selection protocol": values(lambda d: f"{d['protocol']} on {d['split']}"),
        "deciding metric": values(lambda d: d["primary"]),
        "interval": values(
            lambda d: (
                f"{d['ci_percent']} % "
                + ("t interval" if "test" in d else f"percentile bootstrap (n_boot {d.get('n_boot')})")
                + " of the paired difference"
            )
        ),
        "test": values(lambda d: d.get("test", "bootstrap resampling seeds and queries together")),
        "multiple comparisons": ", ".join(
            dict.fromkeys(
                f"Holm over the Recall@5 tests (m: each table), alpha {f['alpha']}, power {f['power']}" for f in holm
            )
        )
        or "none: each verdict reads its own raw interval",
        "adoption rule": values(lambda d: d["rule"]),
    }
    return pd.DataFrame([{"item": k, "value": v} for k, v in rows.items()])


def seed_rows(final: dict) -> pd.DataFrame:
    """Per seed (then mean and std) the test Recall@1/5/10 of the final configuration, and the same
    for the default recipe when ``04_demo`` recorded it."""
    rows = []
    for model, seeds in (
        ("final configuration", final["seeds"]),
        ("default recipe", final.get("default_recipe_seeds")),
    ):
        for seed, row in (seeds or {}).items():
            spread = seed in ("mean", "std")
            rows.append(
                {
                    "model": model,
                    "seed": seed,
                    "best epoch": "—" if spread else int(row["best_epoch"]),
                    "val R@5": "—" if pd.isna(row["val_recall@5"]) else f"{row['val_recall@5']:.3f}",
                    **{
                        f"test R@{k}": ("—" if pd.isna(row[f"test_recall@{k}"]) else f"{row[f'test_recall@{k}']:.3f}")
                        + ("" if spread else f" {row[f'test_recall@{k}_ci']}")
                        for k in study.KS
                    },
                }
            )
    return pd.DataFrame(rows)
