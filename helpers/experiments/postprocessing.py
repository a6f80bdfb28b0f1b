"""The post-processing experiment (no training): every method of the evaluation layer's registry
(:data:`helpers.evaluation.postprocess.METHODS`: flip TTA, αQE, DBA, k-reciprocal re-ranking)
on every seed's run of the final configuration, each against plain cosine (``none``) with the
study's paired statistics, Holm over this experiment's own tests (they change no training, so
they are not in the study's family), adopted by :data:`helpers.experiments.catalogue.POSTPROCESS_RULE`.

Writes ``results/<profile>/postprocess/{runs.csv, comparison.csv, decision.json}`` and, per
method and seed, the val ranks every test is computed from (``ranks/<method>_seed<N>.csv``), so
the tests can be recomputed from the committed files. Whatever it adopts, ``04_demo``, the gallery
index and the live demo apply (:func:`helpers.experiments.final_runs.postprocess_choice`).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from helpers.core import runtime
from helpers.core.files import write_text_atomic
from helpers.core.progress import progress_bar
from helpers.core.schema import read_table
from helpers.evaluation import inference, metrics, postprocess
from helpers.experiments import comparison, family, runs
from helpers.experiments.catalogue import POSTPROCESS, POSTPROCESS_QUESTION, POSTPROCESS_RULE, PRIMARY
from helpers.experiments.study import Study, write_tables
from helpers.modeling import checkpoints
from helpers.training import train

REFERENCE = "none"
RANKS = "ranks"


def val_embeddings(run_dir: Path, table: pd.DataFrame, data_root: Path, flip_tta: bool, progress: bool = False):
    """``(val queries, val gallery, their embeddings)`` under the official protocol, embedded in one
    pass with the run's ``best.pt``, with or without the flip test-time augmentation."""
    embedder, cfg = checkpoints.load_embedder(run_dir / "best.pt")
    cfg = replace(cfg, flip_tta=flip_tta)
    device = runtime.resolve_device(cfg.device)
    queries, gallery = metrics.protocol_sets(table, "val", "official")
    both = pd.concat([queries, gallery])
    embedded = inference.embed_table(cfg, embedder.to(device), both, data_root, device, progress=progress, desc="val")
    return queries, gallery, embedded[: len(queries)], embedded[len(queries) :]


def method_ranks(run_dir: Path, table: pd.DataFrame, data_root: Path, progress: bool = False) -> dict:
    """method → ``(val_ranks.csv``-like frame, seconds of post-processing)`` for one run: val embedded
    once plainly and once with flip TTA, every method ranked from them by the one ranking routine."""
    queries, gallery, *plain = val_embeddings(run_dir, table, data_root, flip_tta=False, progress=progress)
    flipped = val_embeddings(run_dir, table, data_root, flip_tta=True, progress=progress)[2:]
    out = {}
    for name in postprocess.METHODS:
        method = postprocess.create_postprocess(name)
        started = time.perf_counter()
        scores = method.scores(*(flipped if method.flip_tta else plain))
        result = metrics.score_metrics(scores, queries.item_id.to_numpy(), gallery.item_id.to_numpy())
        frame = metrics.ranks_table(queries, result)
        out[name] = (frame, time.perf_counter() - started)
    return out


def read_ranks(folder: Path, table: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    """``(method, seed) → ranks`` from the committed ``ranks/`` files of a ``runs.csv``."""
    return {
        (r.variant, r.seed): pd.read_csv(folder / RANKS / f"{r.variant}_seed{r.seed}.csv") for r in table.itertuples()
    }


def run_postprocess(study: Study) -> dict:
    """Every method on every seed's run of the final configuration (see the module docstring),
    embedded with its checkpoint, or a local retrain of it where the checkpoint is not here
    (:meth:`Study.final_checkpoints`); returns ``runs``, ``comparison`` and ``decision``."""
    data_root, table_path = study.prepared()
    image_table, out = read_table(table_path), study.root / POSTPROCESS
    rows, ranks = [], {}
    final, checkpoints_at = study.final_runs(), study.final_checkpoints()
    (out / RANKS).mkdir(parents=True, exist_ok=True)
    for seed, run_dir in progress_bar(final.items(), desc="post-processing", disable=not study.progress):
        best_epoch = int(train.fit_record(run_dir)["best_epoch"])
        ranked = method_ranks(checkpoints_at[seed], image_table, data_root, study.progress)
        for method, (frame, seconds) in ranked.items():
            ranks[(method, seed)] = frame
            write_text_atomic(out / RANKS / f"{method}_seed{seed}.csv", frame.to_csv(index=False, lineterminator="\n"))
            rows.append(
                {
                    "experiment": POSTPROCESS,
                    "variant": method,
                    "seed": seed,
                    "parameters": json.dumps(postprocess.METHODS[method], sort_keys=True),
                    "run_dir": str(run_dir.relative_to(study.root)),
                    "best_epoch": best_epoch,
                    **{f"val_{m}": v for m, v in runs.metrics_from_ranks(frame).items()},
                    "postprocess_s": round(seconds, 3),
                }
            )
    return write_postprocess(study, pd.DataFrame(rows), ranks)


def write_postprocess(study: Study, table: pd.DataFrame, ranks: dict) -> dict:
    """The comparison and decision of the post-processing runs (also from committed ranks alone)."""
    table_cmp, holm = comparison.compare(table, ranks, reference=REFERENCE)
    winner, why = comparison.decide(table_cmp)
    winner = REFERENCE if winner == "baseline" else winner
    decision = {
        "experiment": POSTPROCESS,
        "question": POSTPROCESS_QUESTION,
        "profile": study.profile,
        "protocol": "official",
        "split": "val",
        "seeds": sorted(table.seed.unique().tolist()),
        "primary": PRIMARY,
        "rule": POSTPROCESS_RULE,
        "winner": winner,
        "why": why.replace("the baseline is kept", f"`{REFERENCE}` is kept"),
        "winner_parameters": postprocess.METHODS[winner],
        "final_config": json.loads((study.root / "final_config.json").read_text())["config"],
        **family.family_record([], 0, holm, len(postprocess.METHODS) - 1),
    }
    write_tables(study.root / POSTPROCESS, table, table_cmp, decision)
    return {"runs": table, "comparison": table_cmp, "decision": decision}


def restate(study: Study) -> dict | None:
    """Recompute the post-processing statistics from the committed ranks (no embedding); None
    when they are not committed (run :func:`run_postprocess`)."""
    folder = study.root / POSTPROCESS
    if not (folder / "runs.csv").is_file() or not (folder / RANKS).is_dir():
        return None
    table = pd.read_csv(folder / "runs.csv")
    return write_postprocess(study, table, read_ranks(folder, table))
