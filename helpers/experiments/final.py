"""The final evaluation a grader re-runs (``04_demo``): one chosen configuration, its trained
checkpoint, test metrics under every protocol, the zero-shot row, per-query ranks and a
success / failure figure, written to ``results/<profile>/final/``.

Steps (each a function the notebook calls):

1. :func:`final_choice`: ``results/<profile>/final_config.json`` when the study has written
   it, else the original study's final choice (batch-hard triplet, 256-d), saying which.
2. :func:`study_runs`: the study's runs of that configuration, every seed (checkpoints missing
   here retrained under the recorded configuration, :func:`reproduction` checking they match);
   without a finished study, :func:`ensure_checkpoint`: one run of the choice (the demo
   pipeline's ``outputs/<profile>/run`` if it matches, else ``outputs/<profile>/final_run_<hash>``),
   trained (resumably) only when the caller allows it. :func:`seed_table` gives every seed's test
   numbers; :func:`demo_seed` (best val Recall@5) serves the index, the figure and the live demo.
3. :func:`helpers.experiments.artifacts.ensure_index` + :func:`evaluate_final`: the test gallery
   embedded once (the same index the live demo serves); each consumer photo embedded as a
   query; Recall@K, mAP, bootstrap intervals and the per-category breakdown under
   ``official``, ``split`` and ``original_pairs`` from the same embeddings, and every query's
   rank of first hit.
4. :func:`zero_shot` and :func:`cli_official`: the untrained backbone, and the CLI's batched
   evaluation of the same checkpoint (an independent code path: the two must agree).
5. :func:`pick_examples` chooses the figure's queries by rank of first hit, never by hand.

Reuse-or-make decisions (data, runs, the index, the zero-shot row) are
:mod:`helpers.experiments.runs`'s, as everywhere else.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.core import runtime, schema
from helpers.core.config import Config
from helpers.core.errors import InputError
from helpers.core.files import portable_path, sha256_bytes, write_text_atomic
from helpers.core.progress import progress_bar
from helpers.evaluation import inference, metrics
from helpers.evaluation.metrics import METRICS
from helpers.experiments import artifacts, study
from helpers.modeling import checkpoints

PROTOCOL_ORDER = ("official", "split", "original_pairs")
# The original study's own final choice (docs/original_study.md): used until the study writes
# results/<profile>/final_config.json.
ORIGINAL_CHOICE = {"loss": "batch_hard", "embed_dim": 256}
ORIGINAL_PUBLISHED = {
    "model": "original study, published: EfficientNet-B3 + batch-hard, 256-d",
    "recall@1": 0.6402,
    "recall@5": 0.7280,
    "recall@10": 0.7751,
    "data": "DeepFashion C2S, TOPS+DRESSES, 2 % of test items (122)",
    "protocol": "original_pairs (its own): every consumer×shop pair row is a query, the split's shop images "
    "repeated once per pair row form the gallery",
}


def final_choice(profile: str, results_root: Path | None = None) -> tuple[dict, str]:
    """``(config overrides, where they came from)`` for the profile's final model.

    ``final_config.json`` may hold the overrides at its top level or under ``"config"``;
    only :class:`Config` field names are taken, anything else there is reported and ignored.
    """
    path = (results_root or artifacts.results_root(profile)) / "final_config.json"
    if not path.is_file():
        return dict(ORIGINAL_CHOICE), (
            f"fallback: the original study's final choice (batch-hard triplet, 256-d), because "
            f"{portable_path(path)} "
            "does not exist yet"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not readable JSON ({error})") from None
    data = data.get("config", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of config fields")
    names = {f.name for f in fields(Config)}
    chosen = {k: v for k, v in data.items() if k in names and k != "profile"}
    ignored = sorted(set(data) - names - {"profile"})
    note = portable_path(path) + (f" (ignored, not config fields: {', '.join(ignored)})" if ignored else "")
    return chosen, note


def postprocess_choice(profile: str, results_root: Path | None = None) -> tuple[str, str]:
    """``(the post-processing method the study adopted, why)``, from ``postprocess/decision.json``:
    ``none`` (rank by plain cosine similarity, what this module and the app do) when that
    experiment has not run or adopted nothing."""
    path = (results_root or artifacts.results_root(profile)) / study.POSTPROCESS / "decision.json"
    if not path.is_file():
        return "none", f"{portable_path(path)} does not exist yet (`python -m helpers study postprocess`)"
    try:
        decision = json.loads(path.read_text())
        return decision["winner"], f"{portable_path(path)}: {decision['why']}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a post-processing decision ({error})") from None


def out_dir(cfg: Config) -> Path:
    """``results/<profile>/final`` (committed); the fixture profile writes under git-ignored outputs/."""
    folder = artifacts.results_root(cfg.profile) / "final"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_mismatch(run_dir: Path, choice: dict) -> list[str]:
    """The fields of ``choice`` on which the run in ``run_dir`` differs (empty: it matches)."""
    config_path = run_dir / "config.json"
    if not (run_dir / "best.pt").is_file() or not config_path.is_file():
        return ["no finished run"]
    used = json.loads(config_path.read_text()).get("config", {})
    return [f"{k}={used.get(k)!r} (want {v!r})" for k, v in choice.items() if used.get(k) != v]


def final_run_dir(cfg: Config, choice: dict) -> Path:
    """``outputs/<profile>/final_run_<hash of the choice>``: a new final configuration trains into
    a new folder, never on top of (or as a resume of) another configuration's run."""
    digest = sha256_bytes(json.dumps(choice, sort_keys=True).encode())[:8]
    return cfg.work_dir / f"final_run_{digest}"


def ensure_checkpoint(
    cfg: Config, choice: dict, table: Path, data_root: Path, train_if_missing: bool, progress: bool = True
) -> tuple[Path, str]:
    """``(best.pt, how it was found)`` of a run trained with ``choice`` on ``cfg``'s profile."""
    looked = []
    for run_dir in (final_run_dir(cfg, choice), cfg.work_dir / "run"):
        mismatch = run_mismatch(run_dir, choice)
        if not mismatch:
            return (
                run_dir / "best.pt",
                f"found: {portable_path(run_dir)} (trained earlier with the chosen configuration)",
            )
        looked.append(f"{run_dir}: {', '.join(mismatch)}")
    if not train_if_missing:
        raise InputError(
            "no trained checkpoint of the chosen configuration ("
            + "; ".join(looked)
            + "); set TRAIN_IF_MISSING = True to train it here"
        )
    run_dir = final_run_dir(cfg, choice)
    # An interrupted earlier attempt continues exactly (a changed choice is refused by fit).
    artifacts.ensure_trained(replace(cfg, **choice), table, data_root, run_dir, progress=progress)
    return (
        run_dir / "best.pt",
        f"trained now: {portable_path(run_dir)} ({', '.join(f'{k}={v}' for k, v in choice.items())})",
    )


def study_runs(
    cfg: Config, choice: dict, table: Path, data_root: Path, train_if_missing: bool, progress: bool = True
) -> tuple[dict[int, Path], dict[int, Path], str]:
    """``(runs, recorded, how)``: seed → run directory with ``best.pt`` of the final configuration,
    seed → the study's own run directory (its history and metrics, committed), and a sentence.

    When the study has finished, the final model *is* its runs of the final configuration,
    every seed, under the exact budget the study selected it with. Their checkpoints are local,
    not committed: a seed whose ``best.pt`` is missing here is retrained from the run's recorded
    configuration into ``outputs/<profile>/final_runs/`` (deterministic kernels reproduce it on
    the same machine kind; :func:`reproduction` compares the two histories). Without a finished
    study there is one run of ``choice`` (:func:`ensure_checkpoint`), and ``recorded`` is empty.
    """
    root = artifacts.results_root(cfg.profile)
    if not (root / "final_config.json").is_file():
        checkpoint, how = ensure_checkpoint(cfg, choice, table, data_root, train_if_missing, progress)
        return {cfg.seed: checkpoint.parent}, {}, how
    recorded = study.final_runs(cfg, root, table, need_checkpoints=False)
    final_cfg, runs, retrained = study.final_config(cfg, root), {}, []
    for seed, run_dir in recorded.items():
        local = cfg.work_dir / "final_runs" / run_dir.name
        if (run_dir / "best.pt").is_file():
            runs[seed] = run_dir
            continue
        if not (local / "best.pt").is_file() and not train_if_missing:
            raise InputError(
                f"{run_dir / 'best.pt'}: missing (checkpoints are not committed); set TRAIN_IF_MISSING = True to "
                f"retrain seed {seed} under its recorded configuration"
            )
        artifacts.ensure_trained(replace(final_cfg, seed=seed), table, data_root, local, progress=progress)
        runs[seed], retrained = local, [*retrained, seed]
    how = f"the study's runs of the final configuration, seeds {', '.join(map(str, recorded))}" + (
        f" (seeds {', '.join(map(str, retrained))} retrained here under the recorded configuration)"
        if retrained
        else ""
    )
    return runs, recorded, how


def reproduction(runs: dict[int, Path], recorded: dict[int, Path]) -> pd.DataFrame:
    """Per seed: the largest difference over epochs between the run used here and the study's
    recorded run, in training loss and val Recall@5 (0 where the study's own run is used)."""
    rows = {}
    for seed, run_dir in runs.items():
        here = pd.read_csv(run_dir / "history.csv")
        there = pd.read_csv(recorded[seed] / "history.csv")
        same_length = len(here) == len(there)
        rows[seed] = {
            "run": "the study's own" if run_dir == recorded[seed] else "retrained here",
            "epochs (here / study)": f"{len(here)} / {len(there)}",
            "max |Δ loss|": float((here.loss - there.loss).abs().max()) if same_length else float("nan"),
            "max |Δ val R@5|": float((here["val_recall@5"] - there["val_recall@5"]).abs().max())
            if same_length
            else float("nan"),
        }
    return pd.DataFrame(rows).T.rename_axis("seed")


def recipe_runs(cfg: Config, table: Path) -> dict[int, Path]:
    """seed → the study's finished runs of the profile's own config (the default recipe, the
    study's stage-1 baseline); empty before the study has run it."""
    root = artifacts.results_root(cfg.profile)
    return study.runs_of(cfg, root, table) if root.is_dir() else {}


def seed_table(runs: dict[int, Path]) -> pd.DataFrame:
    """One row per seed: best epoch, val Recall@5 at it, and test Recall@1/5/10 (official
    protocol, as ``fit`` evaluated ``best.pt``) with each seed's 95 % bootstrap interval; then
    the mean and the sample std over seeds."""
    rows = {}
    for seed, run_dir in runs.items():
        result = json.loads((run_dir / "metrics.json").read_text())
        row = {"best_epoch": result["best_epoch"], "val_recall@5": result["val"]["recall@5"]}
        for k in (1, 5, 10):
            low, high = result[f"recall@{k}_ci"]
            row[f"test_recall@{k}"] = result[f"recall@{k}"]
            row[f"test_recall@{k}_ci"] = f"[{low:.3f}, {high:.3f}]"
        rows[seed] = row
    table = pd.DataFrame(rows).T.rename_axis("seed")
    numeric = [c for c in table.columns if not c.endswith("_ci")]
    table[numeric] = table[numeric].astype(float)
    summary = pd.DataFrame({"mean": table[numeric].mean(), "std": table[numeric].std(ddof=1)}).T
    return pd.concat([table, summary])


def demo_seed(runs: dict[int, Path]) -> int:
    """The seed whose run serves the index, the figure and the live demo: the best val Recall@5
    (model selection on val, as ``fit`` selects its epoch; the lowest seed on a tie)."""
    val = {seed: json.loads((d / "metrics.json").read_text())["val"]["recall@5"] for seed, d in runs.items()}
    return max(sorted(val), key=lambda seed: val[seed])


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
    """Metrics under every protocol from one set of embeddings, and the per-query table.

    The queries plus the index's gallery (official: shop images of val + test) hold every
    image each protocol uses (``split`` and ``original_pairs`` take the test shop images, a
    subset), so ``metrics.evaluate_protocol`` picks the right rows for each.
    """
    gallery = index.gallery.reset_index(drop=True)
    used = pd.concat([queries, gallery], ignore_index=True)
    embeddings = np.concatenate([query_embeddings, np.asarray(index.embeddings)])
    results = {p: metrics.evaluate_protocol(used, embeddings, split="test", protocol=p) for p in PROTOCOL_ORDER}
    ranked = metrics.retrieval_metrics(
        query_embeddings, queries.item_id.to_numpy(), index.embeddings, gallery.item_id.to_numpy()
    )
    per_query = queries.iloc[ranked.query_index][["path", "item_id", "category", "x_1", "y_1", "x_2", "y_2"]].copy()
    per_query["rank_of_first_hit"] = ranked.first_hit_rank + 1  # 1 = the top image is of the item
    per_query["average_precision"] = ranked.average_precision
    per_query["n_relevant"] = ranked.n_relevant
    return results, per_query.reset_index(drop=True)


def zero_shot(model_config: dict, cfg: Config, table: Path, data_root: Path, out: Path, progress: bool = True) -> dict:
    """The same backbone untrained (pooled features, its weights as recorded), official protocol."""
    untrained = replace(
        cfg,
        backbone=model_config["backbone"],
        weights=model_config.get("weights_source") or "auto",
        img_size=model_config["data_config"]["input_size"][-1],
    )
    return artifacts.ensure_zero_shot(untrained, table, data_root, out, progress)


def cli_official(checkpoint: Path, table: Path, data_root: Path, out: Path, progress: bool = True) -> dict:
    """What ``python -m helpers evaluate --checkpoint`` computes: batched embedding of the table,
    the training code's path, independent of the one-query-at-a-time path above."""
    if not out.is_file() or out.stat().st_mtime < checkpoint.stat().st_mtime:
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


def ensure_final_index(cfg: Config, train_if_missing: bool, progress: bool = True) -> tuple[Path, dict]:
    """Data, choice, the final runs and the demo seed's test index in one call (``05_live_demo``
    uses it; ``04_demo`` runs the same steps one cell at a time). Returns the index folder and a
    record of where each piece came from."""
    data_root, table = artifacts.ensure_prepared(cfg, progress)
    choice, source = final_choice(cfg.profile)
    runs, _, how = study_runs(cfg, choice, table, data_root, train_if_missing, progress)
    seed = demo_seed(runs)
    checkpoint = runs[seed] / "best.pt"
    index_dir = artifacts.ensure_index(checkpoint, table, data_root, cfg.work_dir / "final_index", progress=progress)
    return index_dir, {
        "choice": choice,
        "choice_source": source,
        "checkpoint": portable_path(checkpoint),
        "checkpoint_source": f"{how}; seed {seed} serves (best val Recall@5)",
        "index": portable_path(index_dir),
    }
