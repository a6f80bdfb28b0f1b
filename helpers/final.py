"""The final evaluation a grader re-runs (``04_demo``): one chosen configuration, its trained
checkpoint, test metrics under every protocol, the zero-shot row, per-query ranks and a
success / failure figure, written to ``results/<profile>/final/``.

Steps (each a function the notebook calls):

1. :func:`final_choice`: ``results/<profile>/final_config.json`` when the study has written
   it, else the seed study's final choice (batch-hard triplet, 256-d), saying which.
2. :func:`ensure_checkpoint`: a trained checkpoint whose run used that choice: the demo
   pipeline's ``outputs/<profile>/run`` if it matches, else ``outputs/<profile>/final_run_<hash>``,
   trained (resumably, through the CLI) only when the caller allows it.
3. :func:`ensure_index` + :func:`evaluate_final`: the test gallery embedded once (the same
   index the live demo serves); each consumer photo embedded as a query; Recall@K, mAP,
   bootstrap intervals and the per-category breakdown under ``official``, ``split`` and
   ``seed_pairs`` from the same embeddings, and every query's rank of first hit.
4. :func:`zero_shot` and :func:`cli_official`: the untrained backbone, and the CLI's batched
   evaluation of the same checkpoint (an independent code path: the two must agree).
5. :func:`pick_examples` chooses the figure's queries by rank of first hit, never by hand.

Everything goes through the CLI (``python -m helpers train / index / evaluate``) or the
index's public API, so this module does not depend on how training is implemented.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import checkpoints, inference, metrics, repro, retrieval, schema, study, train
from .config import REPO_ROOT, Config
from .errors import InputError
from .files import write_text_atomic

PROTOCOL_ORDER = ("official", "split", "seed_pairs")
METRIC_COLUMNS = ["recall@1", "recall@5", "recall@10", "recall@20", "map"]
# The seed study's own final choice (shared/reference/seed_project.md): used until the
# study writes results/<profile>/final_config.json.
SEED_CHOICE = {"loss": "batch_hard", "embed_dim": 256}
SEED_PUBLISHED = {
    "model": "seed study, published: EfficientNet-B3 + batch-hard, 256-d",
    "recall@1": 0.6402,
    "recall@5": 0.7280,
    "recall@10": 0.7751,
    "data": "DeepFashion C2S, TOPS+DRESSES, 2 % of test items (122)",
    "protocol": "seed_pairs (its own): every consumer×shop pair row is a query, the split's shop images "
    "repeated once per pair row form the gallery",
}


def final_choice(profile: str, results_root: Path | None = None) -> tuple[dict, str]:
    """``(config overrides, where they came from)`` for the profile's final model.

    ``final_config.json`` may hold the overrides at its top level or under ``"config"``;
    only :class:`Config` field names are taken, anything else there is reported and ignored.
    """
    path = (results_root or study.results_root(profile)) / "final_config.json"
    if not path.is_file():
        return dict(SEED_CHOICE), (
            f"fallback: the seed study's final choice (batch-hard triplet, 256-d), because "
            f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path} "
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
    note = f"{path}" + (f" (ignored, not config fields: {', '.join(ignored)})" if ignored else "")
    return chosen, note


def out_dir(cfg: Config) -> Path:
    """``results/<profile>/final`` (committed); the fixture profile writes under git-ignored outputs/."""
    folder = study.results_root(cfg.profile) / "final"
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
    digest = hashlib.sha256(json.dumps(choice, sort_keys=True).encode()).hexdigest()[:8]
    return cfg.work_dir / f"final_run_{digest}"


def ensure_checkpoint(
    cfg: Config, choice: dict, table: Path, data_root: Path, train_if_missing: bool, progress: bool = True
) -> tuple[Path, str]:
    """``(best.pt, how it was found)`` of a run trained with ``choice`` on ``cfg``'s profile."""
    looked = []
    for run_dir in (final_run_dir(cfg, choice), cfg.work_dir / "run"):
        mismatch = run_mismatch(run_dir, choice)
        if not mismatch:
            return run_dir / "best.pt", f"found: {run_dir} (trained earlier with the chosen configuration)"
        looked.append(f"{run_dir}: {', '.join(mismatch)}")
    if not train_if_missing:
        raise InputError(
            "no trained checkpoint of the chosen configuration ("
            + "; ".join(looked)
            + "); set TRAIN_IF_MISSING = True to train it here"
        )
    run_dir = final_run_dir(cfg, choice)
    # An interrupted earlier attempt continues exactly (a changed choice is refused by fit).
    train.fit(
        replace(cfg, **choice), table, data_root, run_dir, resume=(run_dir / "last.pt").is_file(), progress=progress
    )
    return run_dir / "best.pt", f"trained now: {run_dir} ({', '.join(f'{k}={v}' for k, v in choice.items())})"


def ensure_index(checkpoint: Path, table: Path, data_root: Path, index_dir: Path, progress: bool = True) -> Path:
    """The official test gallery embedded once with the checkpoint (rebuilt if it is stale)."""
    meta_path = index_dir / "index.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("checkpoint") == str(checkpoint):
        stale = (index_dir / "embeddings.npy").stat().st_mtime < checkpoint.stat().st_mtime
        if not stale:
            return index_dir
    if index_dir.exists():
        import shutil

        shutil.rmtree(index_dir)
    retrieval.build_index(checkpoint, table, data_root, index_dir, split="test", protocol="official", progress=progress)
    return index_dir


def consumer_queries(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The unique consumer photos of ``split`` (the queries of every protocol but seed_pairs)."""
    rows = table[(table.domain == "consumer") & (table.split == split)]
    return rows.drop_duplicates("path").sort_values("path").reset_index(drop=True)


def embed_queries(index, queries: pd.DataFrame, data_root: Path, progress: bool = True) -> np.ndarray:
    """Each query photo embedded alone through the index's model, box-cropped as in training."""
    rows = list(queries.itertuples(index=False))
    return np.concatenate(
        [
            index.embed_image(Path(data_root) / r.path, box=(r.x_1, r.y_1, r.x_2, r.y_2))
            for r in tqdm(rows, desc="embedding test queries", disable=not progress)
        ]
    )


def evaluate_final(index, queries: pd.DataFrame, query_embeddings: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """Metrics under every protocol from one set of embeddings, and the per-query table.

    The queries plus the index's gallery (official: shop images of val + test) hold every
    image each protocol uses (``split`` and ``seed_pairs`` take the test shop images, a
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
    if not out.is_file():
        weights = model_config.get("weights_source") or "auto"
        untrained = replace(
            cfg,
            backbone=model_config["backbone"],
            weights=weights,
            img_size=model_config["data_config"]["input_size"][-1],
        )
        result = inference.evaluate_zero_shot(untrained, schema.read_table(table), data_root, progress=progress)
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    return json.loads(out.read_text())


def cli_official(checkpoint: Path, table: Path, data_root: Path, out: Path, progress: bool = True) -> dict:
    """What ``python -m helpers evaluate --checkpoint`` computes: batched embedding of the table,
    the training code's path, independent of the one-query-at-a-time path above."""
    if not out.is_file() or out.stat().st_mtime < checkpoint.stat().st_mtime:
        embedder, run_cfg = checkpoints.load_embedder(checkpoint)
        device = repro.resolve_device(run_cfg.device)
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
        for m in METRIC_COLUMNS
    }
    rows["n_queries"] = {
        "04_demo (one query at a time)": ours["n_queries"],
        "CLI evaluate (batched)": cli["n_queries"],
        "difference": ours["n_queries"] - cli["n_queries"],
    }
    return pd.DataFrame(rows).T


def _cell(result: dict, metric: str) -> str:
    if metric not in result:
        return "—"
    ci = result.get(metric + "_ci")
    return f"{result[metric]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def comparison(results: dict, zero: dict, data_label: str) -> pd.DataFrame:
    """Trained (3 protocols), zero-shot and the seed's published row, with what each measured."""
    rows = []
    for protocol in PROTOCOL_ORDER:
        rows.append(("trained, final config", protocol, data_label, results[protocol]))
    weights = zero.get("model", {}).get("weights_source", "?")
    weights = "random-init" if weights == "none" else weights
    rows.append((f"zero-shot, same backbone ({weights} weights)", "official", data_label, zero))
    rows.append((SEED_PUBLISHED["model"], "seed_pairs (its own)", SEED_PUBLISHED["data"], SEED_PUBLISHED))
    table = pd.DataFrame(
        [
            {
                "model": name,
                "protocol": protocol,
                "data": data,
                **{m: _cell(r, m) for m in METRIC_COLUMNS},
                "n_queries": r.get("n_queries", "—"),
                "n_gallery": r.get("n_gallery", "—"),
            }
            for name, protocol, data, r in rows
        ]
    )
    return table.set_index(["model", "protocol"])


def per_category(result: dict) -> pd.DataFrame:
    return pd.DataFrame(result["per_category"]).T[["n_queries", *METRIC_COLUMNS]]


def pick_examples(per_query: pd.DataFrame, n: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(successes, failures)``: the ``n`` queries with the best and the worst rank of first
    hit (ties broken by path), so the figure is chosen by the metric, not by hand."""
    ordered = per_query.sort_values(["rank_of_first_hit", "path"], kind="stable")
    worst = per_query.sort_values(["rank_of_first_hit", "path"], ascending=[False, True], kind="stable")
    best = ordered.head(n)
    return best, worst[~worst.path.isin(best.path)].head(n)


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
    """Data, choice, checkpoint and test index of a profile in one call (``05_live_demo`` uses
    it; ``04_demo`` runs the same steps one cell at a time). Returns the index folder and a
    record of where each piece came from."""
    from . import workspace

    data_root, table = workspace.ensure_prepared(cfg, progress)
    choice, source = final_choice(cfg.profile)
    checkpoint, how = ensure_checkpoint(cfg, choice, table, data_root, train_if_missing, progress)
    index_dir = ensure_index(checkpoint, table, data_root, cfg.work_dir / "final_index", progress)
    return index_dir, {
        "choice": choice,
        "choice_source": source,
        "checkpoint": str(checkpoint),
        "checkpoint_source": how,
        "index": str(index_dir),
    }
