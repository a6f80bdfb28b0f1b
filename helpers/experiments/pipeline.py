"""The offline demo end to end, on one profile: data → zero-shot baseline → training →
evaluation → gallery index → search. Every step reuses what an earlier call finished (a
half-finished training run is resumed, which refuses a changed config or table), so the
demo can be interrupted and run again.
"""

from __future__ import annotations

from helpers.core import schema
from helpers.core.config import Config
from helpers.data import sampling
from helpers.evaluation import gallery, plots
from helpers.experiments import artifacts
from helpers.training import train


def run_demo(cfg: Config, progress: bool = True) -> dict:
    """The whole demo for a profile; returns the paths it wrote and the comparison table."""
    data_root, table_path = artifacts.ensure_prepared(cfg, progress)
    table = schema.read_table(table_path)
    if progress:  # before the long steps, so the data is known while they run
        print(f"prepared {table_path}:\n{sampling.split_stats(table).to_string()}\n", flush=True)
    work = cfg.work_dir
    plots.plot_pairs(table, data_root, n_items=4, seed=cfg.seed).savefig(work / "sample_pairs.png", dpi=80)

    baseline = artifacts.ensure_zero_shot(cfg, table_path, data_root, work / "zero_shot_metrics.json", progress)
    run_dir = work / "run"
    artifacts.ensure_trained(cfg, table_path, data_root, run_dir, progress)
    result = train.ensure_test_metrics(run_dir, table_path, data_root, progress)  # best.pt, once on test
    index_dir = artifacts.ensure_index(
        run_dir / "best.pt",
        table_path,
        data_root,
        work / "index",
        device=cfg.device,
        num_workers=cfg.num_workers,
        progress=progress,
    )
    index = gallery.GalleryIndex.load(index_dir)
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
        "comparison": artifacts.comparison_table(
            [
                {"model": f"zero-shot ({baseline['model']['weights_source']} weights)", "result": baseline},
                {"model": f"trained (best.pt, epoch {result['best_epoch']})", "result": result},
            ]
        ),
        "figures": [work / "sample_pairs.png", work / "retrieval.png"],
    }
