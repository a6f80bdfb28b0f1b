"""The final evaluation a grader re-runs (``04_demo``): one chosen configuration, its trained
checkpoint, test metrics under every protocol, the zero-shot row, per-query ranks and a
success / failure figure, written to ``results/<profile>/final/``.

Steps (each a function the notebook calls):

1. and 2. The final configuration, its runs of every seed and their test numbers, the seed that
   serves the demo: :mod:`helpers.experiments.final_runs`.
3. :func:`helpers.experiments.artifacts.ensure_index` + :func:`evaluate_final`: the test gallery
   embedded once (the same index the live demo serves); each consumer photo embedded as a
   query; Recall@K, mAP, bootstrap intervals over items and the per-category breakdown under
   ``official``, ``split`` and ``original_pairs`` from the same embeddings, and every query's
   rank of first hit.
4. :func:`zero_shot` and :func:`cli_official`: the untrained backbone, and the CLI's batched
   evaluation of the same checkpoint (an independent code path: the two must agree);
   :func:`foundation_zero_shot`: foundation ViTs (DINOv2, CLIP, SigLIP) untrained, under ``full``.
5. :func:`pick_examples` chooses the figure's queries by rank of first hit, never by hand.

Reuse-or-make decisions (data, runs, the index, the zero-shot row) are
:mod:`helpers.experiments.artifacts`'s, as everywhere else.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.core import runtime, schema
from helpers.core.config import Config, config_from_dict
from helpers.core.files import portable_path, write_text_atomic
from helpers.core.progress import progress_bar, show_bars
from helpers.evaluation import inference, metrics, postprocess
from helpers.evaluation.metrics import METRICS
from helpers.experiments import artifacts
from helpers.experiments.final_runs import demo_seed, final_choice, postprocess_choice, source_line, study_runs
from helpers.modeling import checkpoints

PROTOCOL_ORDER = ("official", "split", "original_pairs")
# Foundation backbones evaluated zero-shot beside the trained model under `full` (hub weights):
# (timm name, input side, pooling). SigLIP has no class token: the mean of its patch tokens.
FOUNDATION_BACKBONES = (
    ("vit_small_patch14_dinov2.lvd142m", 224, "cls"),
    ("vit_base_patch16_clip_224.openai", 224, "cls"),
    ("vit_base_patch16_siglip_224.webli", 224, "avg"),
)
ORIGINAL_PUBLISHED = {
    "model": "original study, published: EfficientNet-B3 + batch-hard, 256-d",
    "recall@1": 0.6402,
    "recall@5": 0.7280,
    "recall@10": 0.7751,
    "data": "DeepFashion C2S, TOPS+DRESSES, 2 % of test items (122)",
    "protocol": "original_pairs (its own): every consumer×shop pair row is a query, the split's shop images "
    "repeated once per pair row form the gallery",
}


def out_dir(cfg: Config) -> Path:
    """``results/<profile>/final`` (committed); the fixture profile writes under git-ignored outputs/."""
    folder = artifacts.results_root(cfg.profile) / "final"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def consumer_queries(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The unique consumer photos of ``split`` (the queries of every protocol but original_pairs)."""
    rows = table[(table.domain == "consumer") & (table.split == split)]
    return rows.drop_duplicates("path").sort_values("path").reset_index(drop=True)


def embed_queries(index, queries: pd.DataFrame, data_root: Path, progress: bool = True) -> np.ndarray:
    """Each query photo embedded alone through the index's model, box-cropped as in training."""
    rows = list(queries.itertuples(index=False))
    return np.concatenate(
        [
            index.embed_image(Path(data_root) / r.path, box=(r.x_1, r.y_1, r.x_2, r.y_2))
            for r in progress_bar(rows, desc="embedding test queries", disable=not progress)
        ]
    )


def evaluate_final(index, queries: pd.DataFrame, query_embeddings: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """Metrics under every protocol from one set of embeddings, and the per-query table, ranked
    with the index's post-processing (``index.postprocess``, recorded in each result under
    ``postprocess``; flip TTA is already in the embeddings, :func:`embed_queries` embeds through
    the index).

    The queries plus the index's gallery (official: shop images of val + test) hold every
    image each protocol uses (``split`` and ``original_pairs`` take the test shop images, a
    subset), so ``metrics.evaluate_protocol`` picks the right rows for each; a method that uses
    the gallery (DBA, αQE, k-reciprocal) uses each protocol's own.
    """
    gallery = index.gallery.reset_index(drop=True)
    used = pd.concat([queries, gallery], ignore_index=True)
    embeddings = np.concatenate([query_embeddings, np.asarray(index.embeddings)])
    method = index.postprocess
    results = {
        p: {
            **metrics.evaluate_protocol(used, embeddings, split="test", protocol=p, scorer=method.scorer),
            "postprocess": method.to_json(),
        }
        for p in PROTOCOL_ORDER
    }
    ranked = metrics.retrieval_metrics(
        query_embeddings,
        queries.item_id.to_numpy(),
        index.embeddings,
        gallery.item_id.to_numpy(),
        scorer=method.scorer,
    )
    per_query = queries.iloc[ranked.query_index][["path", "item_id", "category", "x_1", "y_1", "x_2", "y_2"]].copy()
    per_query["rank_of_first_hit"] = ranked.first_hit_rank + 1  # 1 = the top image is of the item
    per_query["average_precision"] = ranked.average_precision
    per_query["n_relevant"] = ranked.n_relevant
    return results, per_query.reset_index(drop=True)


def zero_shot(checkpoint: Path, table: Path, data_root: Path, out: Path, progress: bool = True) -> dict:
    """The trained model's backbone untrained, official protocol: its pooled features with the
    weights, input size, pooling and preprocessing its run recorded (crop, resize, margin, colour)."""
    recorded = json.loads((Path(checkpoint).parent / "config.json").read_text())
    model = recorded["model"]
    untrained = replace(
        config_from_dict(recorded["config"]),
        weights=model.get("weights_source") or "auto",
        img_size=model["data_config"]["input_size"][-1],
    )
    return artifacts.ensure_zero_shot(untrained, table, data_root, out, progress)


def foundation_zero_shot(
    cfg: Config,
    table: Path,
    data_root: Path,
    out_dir: Path,
    backbones=FOUNDATION_BACKBONES,
    weights: str = "hub",
    progress: bool = True,
) -> list[dict]:
    """Each foundation backbone untrained (its L2-normalised pooled features, no head), test split
    under the official protocol: one :func:`helpers.experiments.artifacts.comparison_table` row each.
    Each result is computed once into ``out_dir/zero_shot_<backbone>.json`` and read back later."""
    rows = []
    for backbone, side, pooling in backbones:
        untrained = replace(cfg, backbone=backbone, weights=weights, img_size=side, pooling=pooling)
        result = artifacts.ensure_zero_shot(
            untrained, table, data_root, Path(out_dir) / f"zero_shot_{backbone}.json", progress
        )
        size = result["model"]["data_config"]["input_size"][-1]
        rows.append({"model": f"zero-shot {backbone} ({pooling}, {size} px)", "protocol": "official", "result": result})
    return rows


def cli_official(
    checkpoint: Path, table: Path, data_root: Path, out: Path, method: str = "none", progress: bool = True
) -> dict:
    """What ``python -m helpers evaluate --checkpoint [--postprocess METHOD]`` computes: batched
    embedding of the table, the training code's path, independent of the one-query-at-a-time path
    above, ranked with the same post-processing."""
    record = json.loads(out.read_text()) if out.is_file() else {}
    stale = not record or out.stat().st_mtime < checkpoint.stat().st_mtime
    if stale or record.get("postprocess", {}).get("name", "none") != method:
        embedder, run_cfg = checkpoints.load_embedder(checkpoint)
        device = runtime.resolve_device(run_cfg.device)
        result = inference.evaluate(
            run_cfg,
            embedder.to(device),
            schema.read_table(table),
            data_root,
            split="test",
            protocol="official",
            device=device,
            progress=progress,
            postprocess=postprocess.create_postprocess(method),
        )
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    return json.loads(out.read_text())


def agreement(ours: dict, cli: dict) -> pd.DataFrame:
    """Per metric: this notebook's value, the CLI's, and their difference."""
    rows = {
        m: {"04_demo (one query at a time)": ours[m], "CLI evaluate (batched)": cli[m], "difference": ours[m] - cli[m]}
        for m in METRICS
    }
    rows["n_queries"] = {
        "04_demo (one query at a time)": ours["n_queries"],
        "CLI evaluate (batched)": cli["n_queries"],
        "difference": ours["n_queries"] - cli["n_queries"],
    }
    return pd.DataFrame(rows).T


def comparison(results: dict, zero: dict, data_label: str) -> pd.DataFrame:
    """Trained (3 protocols), zero-shot and the original study's published row, with what each measured."""
    weights = zero.get("model", {}).get("weights_source", "?")
    weights = "random-init" if weights == "none" else weights
    rows = [
        {"model": "trained, final config", "protocol": p, "data": data_label, "result": results[p]}
        for p in PROTOCOL_ORDER
    ]
    rows.append(
        {
            "model": f"zero-shot, same backbone ({weights} weights)",
            "protocol": "official",
            "data": data_label,
            "result": zero,
        }
    )
    rows.append(
        {
            "model": ORIGINAL_PUBLISHED["model"],
            "protocol": "original_pairs (its own)",
            "data": ORIGINAL_PUBLISHED["data"],
            "result": ORIGINAL_PUBLISHED,
        }
    )
    return artifacts.comparison_table(rows).set_index("protocol", append=True)


def per_category(result: dict) -> pd.DataFrame:
    return pd.DataFrame(result["per_category"]).T[["n_queries", *METRICS]]


def pick_examples(per_query: pd.DataFrame, n: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(successes, failures)``: the ``n`` queries with the best and the worst rank of first
    hit (ties broken by path), one per item and no item in both, so the figure is chosen by the
    metric, not by hand, and shows ``2 n`` different garments."""
    ordered = per_query.sort_values(["rank_of_first_hit", "path"], kind="stable").drop_duplicates("item_id")
    worst = per_query.sort_values(["rank_of_first_hit", "path"], ascending=[False, True], kind="stable")
    best = ordered.head(n)
    return best, worst[~worst.item_id.isin(best.item_id)].drop_duplicates("item_id").head(n)


def example_hits(index, rows: pd.DataFrame, data_root: Path, k: int = 5) -> list[list[dict]]:
    return [
        index.search_image(Path(data_root) / r.path, box=(r.x_1, r.y_1, r.x_2, r.y_2), k=k)
        for r in rows.itertuples(index=False)
    ]


def _compared(value: float, other: float) -> str:
    return "higher" if value > other + 1e-12 else "lower" if value < other - 1e-12 else "equal"


def findings(
    choice: dict, recipe: Config, method: str, seeds: pd.DataFrame, seed: int, results: dict, zero: dict, val: dict
) -> list[str]:
    """``04_demo``'s closing lines, every number read from this execution's results (the choice,
    the seed table, the demo seed's test results under every protocol, the zero-shot row, its
    val result), none stated by hand: the prose around them stays true when the study changes."""
    as_json = lambda value: json.loads(json.dumps(value, default=str))  # tuples and lists alike
    changed = {k: v for k, v in choice.items() if as_json(getattr(recipe, k, None)) != as_json(v)}
    ranking = "plain cosine similarity" if method == "none" else f"post-processing {method}"
    lines = [
        "final configuration: "
        + (
            "the profile's default recipe, unchanged"
            if not changed
            else "the profile's default recipe with " + ", ".join(f"{k}={v}" for k, v in changed.items())
        )
        + f"; ranked by {ranking}"
    ]
    per_seed = seeds.drop(index=["mean", "std"])
    ks = (1, 5, 10)
    if len(per_seed) > 1:
        spread = ", ".join(
            f"Recall@{k} {seeds.loc['mean', f'test_recall@{k}']:.3f} ± {seeds.loc['std', f'test_recall@{k}']:.3f}"
            for k in ks
        )
        lines.append(f"test over {len(per_seed)} seeds (official protocol, mean ± sample std): {spread}")
    else:
        lines.append(
            "test, one seed (official protocol): "
            + ", ".join(f"Recall@{k} {seeds.loc['mean', f'test_recall@{k}']:.3f}" for k in ks)
        )
    lines.append(f"where each seed's test numbers come from: {source_line(seeds)}")
    official, pairs = results["official"], results["original_pairs"]
    low, high = official["recall@5_ci"]
    first, last = per_seed["test_recall@5"].min(), per_seed["test_recall@5"].max()
    where = (
        "within"
        if first - 1e-9 <= official["recall@5"] <= last + 1e-9
        else ("above" if official["recall@5"] > last else "below")
    )
    lines.append(
        f"demo model: seed {seed}, the best on val; test Recall@5 {official['recall@5']:.3f} [{low:.3f}, {high:.3f}] "
        f"(interval over test items), {where} the seeds' range [{first:.3f}, {last:.3f}]; the same backbone "
        f"untrained: {zero['recall@5']:.3f}"
    )
    lines.append(
        f"val against test: a test query searches {official['n_gallery']} shop images (val and test), a val query "
        f"{val['n_gallery']}; seed {seed} scores Recall@1 {val['recall@1']:.3f} on val and "
        f"{official['recall@1']:.3f} on test"
    )
    lines.append(
        "original_pairs against official, same embeddings: "
        + ", ".join(
            f"Recall@{k} {pairs[f'recall@{k}']:.3f} against {official[f'recall@{k}']:.3f} "
            f"({_compared(pairs[f'recall@{k}'], official[f'recall@{k}'])})"
            for k in (1, 5)
        )
        + f"; the original study published Recall@1 {ORIGINAL_PUBLISHED['recall@1']:.3f} under its own protocol "
        f"({ORIGINAL_PUBLISHED['data']})"
    )
    return lines


def write_outputs(
    out: Path, record: dict, per_query: pd.DataFrame, tables: dict[str, pd.DataFrame], figures: dict
) -> list[Path]:
    """metrics.json, per_query_ranks.csv, the tables as CSV and the figures as PNG under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json", out / "per_query_ranks.csv"]
    written[0].write_text(json.dumps(record, indent=2, default=str) + "\n")
    per_query.to_csv(written[1], index=False, lineterminator="\n")
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", lineterminator="\n")
        written.append(out / f"{name}.csv")
    for name, figure in figures.items():
        figure.savefig(out / f"{name}.png", dpi=80)
        written.append(out / f"{name}.png")
    return written


def model_config(checkpoint: Path) -> dict:
    """The model config its run recorded (backbone, weights source, input size, ...)."""
    return json.loads((Path(checkpoint).parent / "config.json").read_text())["model"]


def ensure_final_index(cfg: Config, train_if_missing: bool, progress: bool | str = True) -> tuple[Path, dict]:
    """Data, choice, the final runs and the demo seed's test index, searched with the adopted
    post-processing (:func:`postprocess_choice`), in one call (``05_live_demo`` uses it; ``04_demo``
    runs the same steps one cell at a time). Returns the index folder and a record of where each
    piece came from. ``progress="epochs"``: a retrain prints a line per epoch, and no step draws a bar."""
    bars = show_bars(progress)
    data_root, table = artifacts.ensure_prepared(cfg, bars)
    choice, source = final_choice(cfg.profile)
    # Only the demo seed is retrained where its checkpoint is missing (the index needs no other).
    runs, recorded, how = study_runs(cfg, choice, table, data_root, train_if_missing, progress)
    seed = demo_seed(recorded or runs)
    checkpoint = runs[seed] / "best.pt"
    method, method_source = postprocess_choice(cfg.profile)
    index_dir = artifacts.ensure_index(
        checkpoint,
        table,
        data_root,
        cfg.work_dir / "final_index",
        progress=bars,
        postprocess=postprocess.create_postprocess(method),
    )
    return index_dir, {
        "choice": choice,
        "choice_source": source,
        "checkpoint": portable_path(checkpoint),
        "checkpoint_source": f"{how}; seed {seed} serves (best val Recall@5)",
        "index": portable_path(index_dir),
        "postprocess": method,
        "postprocess_source": method_source,
    }
