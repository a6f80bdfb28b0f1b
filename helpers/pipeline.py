"""The offline demo end to end, on one profile: data → zero-shot baseline → training →
evaluation → gallery index → search. Every step reuses what an earlier call finished (a
half-finished training run is resumed, which refuses a changed config or table), so the
demo can be interrupted and run again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from . import inference, plots, retrieval, sampling, schema, train, workspace
from .config import Config

METRIC_COLUMNS = ["recall@1", "recall@5", "recall@10", "recall@20", "map"]


def zero_shot(cfg: Config, table: pd.DataFrame, data_root: Path, out: Path, progress: bool) -> dict:
    """Test metrics of the pretrained backbone's pooled features, before any training."""
    if out.is_file():
        return json.loads(out.read_text())
    result = inference.evaluate_zero_shot(cfg, table, data_root, split="test", progress=progress)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def trained(cfg: Config, table_path: Path, data_root: Path, run_dir: Path, progress: bool) -> dict:
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    return train.fit(cfg, table_path, data_root, run_dir, resume=(run_dir / "last.pt").is_file(), progress=progress)


def comparison(results: dict[str, dict]) -> pd.DataFrame:
    """Rows = models, columns = metrics with their 95 % bootstrap intervals."""
    rows = {}
    for name, result in results.items():
        row = {m: f"{result[m]:.3f} [{result[m + '_ci'][0]:.3f}, {result[m + '_ci'][1]:.3f}]" for m in METRIC_COLUMNS}
        rows[name] = {**row, "n_queries": result["n_queries"], "n_gallery": result["n_gallery"]}
    return pd.DataFrame(rows).T


def run_demo(cfg: Config, progress: bool = True) -> dict:
    """The whole demo for a profile; returns the paths it wrote and the comparison table."""
    data_root, table_path = workspace.ensure_prepared(cfg, progress)
    table = schema.read_table(table_path)
    if progress:  # before the long steps, so the data is known while they run
        print(f"prepared {table_path}:\n{sampling.split_stats(table).to_string()}\n", flush=True)
    work = cfg.work_dir
    plots.plot_pairs(table, data_root, n_items=4, seed=cfg.seed).savefig(work / "sample_pairs.png", dpi=80)

    baseline = zero_shot(cfg, table, data_root, work / "zero_shot_metrics.json", progress)
    run_dir = work / "run"
    result = trained(cfg, table_path, data_root, run_dir, progress)
    index_dir = work / "index"
    if not (index_dir / "index.json").is_file():
        retrieval.build_index(
            run_dir / "best.pt",
            table_path,
            data_root,
            index_dir,
            device=cfg.device,
            num_workers=cfg.num_workers,
            progress=progress,
        )
    index = retrieval.GalleryIndex.load(index_dir)
    queries = table.loc[(table.split == "test") & (table.domain == "consumer")].drop_duplicates("item_id")
    queries = queries.sample(n=min(4, len(queries)), random_state=cfg.seed)
    hits = [
        index.search_image(data_root / q.path, box=(q.x_1, q.y_1, q.x_2, q.y_2), k=5)
        for q in queries.itertuples(index=False)
    ]
    plots.plot_retrieval(queries, hits, data_root).savefig(work / "retrieval.png", dpi=80)
    return {
        "data_root": data_root,
        "table": table_path,
        "run": run_dir,
        "index": index_dir,
        "comparison": comparison(
            {
                f"zero-shot ({baseline['model']['weights_source']} weights)": baseline,
                f"trained (best.pt, epoch {result['best_epoch']})": result,
            }
        ),
        "figures": [work / "sample_pairs.png", work / "retrieval.png"],
    }
