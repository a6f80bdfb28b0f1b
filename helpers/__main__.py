"""Command line: ``python -m helpers COMMAND ...`` (the contract is in DESIGN.md).

Every command exits 0 on success and 2 with a one-line ``error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .errors import InputError
from .files import write_text_atomic

SPLIT_CHOICES = ("train", "val", "test")  # helpers.schema.SPLITS, without importing pandas for --help
PROTOCOL_CHOICES = ("official", "split", "seed_pairs")


def cmd_fixture(args) -> None:
    from . import synthetic

    counts = synthetic.generate_tree(args.out_dir, n_items=args.items, seed=args.seed, progress=not args.quiet)
    print(json.dumps(counts, indent=2))


def cmd_prepare(args) -> None:
    from . import sampling

    if args.sample is not None and args.resplit is not None:
        raise InputError("choose either --sample or --resplit, not both")
    summary = sampling.prepare(
        args.data_root,
        args.out,
        categories=sampling.parse_categories(args.categories),
        sample=None if args.resplit else sampling.parse_fractions(args.sample or "0.1,0.02,0.02", "--sample"),
        resplit=sampling.parse_fractions(args.resplit, "--resplit") if args.resplit else None,
        seed=args.seed,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        json.dumps({k: summary[k] for k in ("splits", "categories", "dropped_rows", "image_check", "images")}, indent=2)
    )
    print(f"wrote {args.out}/images.csv and {args.out}/summary.json")


# Config fields a run's flags may override (the data fields belong to `prepare`).
TRAIN_OVERRIDES = (
    "backbone",
    "weights",
    "img_size",
    "resize",
    "box_margin",
    "crop",
    "augment",
    "photometric",
    "embed_dim",
    "head",
    "pooling",
    "loss",
    "margin",
    "temperature",
    "xbm_size",
    "xbm_start_epoch",
    "p_items",
    "k_images",
    "epochs",
    "optimizer",
    "lr",
    "backbone_lr_mult",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "grad_clip",
    "patience",
    "amp",
    "seed",
    "deterministic",
    "num_workers",
    "embed_batch",
    "device",
    "flip_tta",
    "compile",
)
RUNTIME_OVERRIDES = ("device", "num_workers", "embed_batch", "flip_tta")


def _config(args, names=TRAIN_OVERRIDES):
    from . import config

    overrides = {name: getattr(args, name, None) for name in names}
    return config.get_config(args.profile, data_root=args.data_root, **overrides)


def _choices() -> dict[str, tuple]:
    """Each named config field's allowed values, from the registries themselves."""
    from . import config, data, losses, models

    return {
        "augment": tuple(data.AUGMENT_PRESETS),
        "photometric": data.PHOTOMETRIC_MODES,
        "resize": data.RESIZE_MODES,
        "loss": tuple(losses.LOSSES),
        "head": models.HEADS,
        "pooling": models.POOLINGS,
        "weights": models.WEIGHT_SOURCES,
        "amp": ("auto", "off"),
        "optimizer": config.OPTIMIZERS,
        "schedule": config.SCHEDULES,
    }


def _profile_defaults(name: str) -> str:
    """``128 (fixture 64, full None)``: the demo profile's default, then the profiles that differ."""
    from . import config

    values = {profile: getattr(cfg, name) for profile, cfg in config.PROFILES.items()}
    others = ", ".join(f"{p} {v}" for p, v in values.items() if p != "demo" and v != values["demo"])
    return f"{values['demo']}" + (f" ({others})" if others else "")


def _config_flags(parser: _Parser, names) -> None:
    """One flag per config field, with its help, its choices and its default per profile; every
    default is None so that only the flags given override the chosen --profile."""
    from . import config

    fields = {f.name: f for f in dataclasses.fields(config.Config)}
    choices = _choices()
    for name in names:
        field = fields[name]
        help_text = f"{field.metadata['help']}; default {_profile_defaults(name)}"
        flag = "--" + name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int}.get(str(field.type), str)
        parser.add_argument(
            flag,
            type=kind,
            default=None,
            choices=choices.get(name),
            help=help_text,
            metavar=None if name in choices else name.upper(),
        )


def cmd_train(args) -> None:
    from . import train

    cfg = _config(args)
    result = train.fit(cfg, args.table, args.data_root, args.out, resume=args.resume, progress=not args.quiet)
    from . import distributed

    if not distributed.current().is_main:  # under torchrun: rank 0 reports for all
        return
    print(json.dumps({k: result[k] for k in ("recall@1", "recall@5", "recall@10", "map", "best_epoch", "stopped")}))
    print(f"wrote {args.out}/metrics.json (test split, official protocol, best.pt of epoch {result['best_epoch']})")


def cmd_evaluate(args) -> None:
    from . import checkpoints, inference, repro, schema

    if (args.checkpoint is None) == (args.backbone is None):
        raise InputError("give either --checkpoint or --backbone (zero-shot), not both and not neither")
    table = schema.read_table(args.table)
    progress = not args.quiet
    if args.checkpoint:
        embedder, cfg = checkpoints.load_embedder(args.checkpoint)
        cfg = dataclasses.replace(
            cfg, **{k: getattr(args, k) for k in RUNTIME_OVERRIDES if getattr(args, k) is not None}
        )
        device = repro.resolve_device(cfg.device)
        result = inference.evaluate(
            cfg,
            embedder.to(device),
            table,
            args.data_root,
            split=args.split,
            protocol=args.protocol,
            device=device,
            progress=progress,
        )
        result["model"] = {**embedder.config, "checkpoint": args.checkpoint}
    else:
        cfg = dataclasses.replace(
            _config(args, RUNTIME_OVERRIDES + ("box_margin", "resize", "photometric")),
            backbone=args.backbone,
            weights=args.weights,
            img_size=args.img_size,
        )
        result = inference.evaluate_zero_shot(
            cfg, table, args.data_root, split=args.split, protocol=args.protocol, progress=progress
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "protocol",
                    "split",
                    "recall@1",
                    "recall@5",
                    "recall@10",
                    "recall@20",
                    "map",
                    "n_queries",
                    "n_excluded_queries",
                    "n_gallery",
                )
            }
        )
    )


def cmd_index(args) -> None:
    from . import retrieval
    from .ann import AnnParams

    ann = AnnParams(
        args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        m=args.m,
        nbits=args.nbits,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        train_size=args.train_size,
        seed=args.ann_seed,
    )
    index = retrieval.build_index(
        args.checkpoint,
        args.table,
        args.data_root,
        args.out,
        split=args.split,
        protocol=args.protocol,
        device=args.device,
        num_workers=args.num_workers,
        progress=not args.quiet,
        ann=ann,
        n_recall=args.recall_queries,
    )
    recall = index["ann"].get("recall_at_10")
    print(
        f"wrote {args.out}: {index['n_gallery']} gallery images, {index['dim']}-d, {args.kind} search"
        + (
            f", recall@10 vs exact {recall:.3f} on {index['ann']['recall_queries']} gallery queries"
            if args.kind != "exact" and recall is not None
            else ""
        )
    )


def cmd_stage(args) -> None:
    from . import staging

    source = Path(args.source)
    if source.is_dir():
        record = staging.stage_dataset(source, args.dest, sha256=args.sha256, progress=not args.quiet)
    else:
        record = staging.stage(
            source, args.dest, sha256=args.sha256, keep_archive=args.keep_archive, progress=not args.quiet
        )
    print(json.dumps(record, indent=2))
    print(f"{args.dest}: {'already staged' if record['already_staged'] else 'staged'} from {record['source']}")


def cmd_search(args) -> None:
    from . import retrieval

    box = _parse_box(args.box) if args.box else None
    results = retrieval.GalleryIndex.load(args.index).search_image(args.image, box=box, k=args.k)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for hit in results:
        print(f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['item_id']}  {hit['path']}")


def _parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--box expects x1,y1,x2,y2 integers, got {text!r}") from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
        raise InputError(f"--box expects x1,y1,x2,y2 with x1 < x2 and y1 < y2, got {text!r}")
    return box


def cmd_serve(args) -> None:
    """The live demo on this machine (helpers.app); Ctrl-C stops it."""
    from . import app

    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be 1..65535, got {args.port}")
    app.serve(args.index, port=args.port, host=args.host, data_root=args.data_root, share=args.share)


def cmd_demo(args) -> None:
    """The offline demo (synthetic data, never presented as DeepFashion): data, zero-shot
    baseline, training, test metrics, index, search."""
    import matplotlib

    matplotlib.use("Agg")
    from . import config, pipeline, sampling, schema

    cfg = config.get_config(args.profile)
    out = pipeline.run_demo(cfg, progress=not args.quiet)
    source = "synthetic data (helpers.synthetic), not DeepFashion" if cfg.data_root is None else str(out["data_root"])
    print(f"profile {cfg.profile}: {source}\ntable {out['table']}")
    print(sampling.split_stats(schema.read_table(out["table"])).to_string())
    print(f"\ntest split, official protocol (95 % bootstrap intervals), backbone {cfg.backbone}:")
    print(out["comparison"].to_string())
    print(f"\nrun {out['run']}\nindex {out['index']}\nfigures " + " ".join(str(f) for f in out["figures"]))


def cmd_study(args) -> None:
    """Run (reuse, resume) an experiment, a stage or the whole study; print each result."""
    from . import study

    chosen = study.select(args.profile, args.experiment)
    study.n_seeds_for(args.profile, args.seeds)  # a bad --seeds fails before any data is prepared
    if len(chosen) > 1:  # the whole plan first, so the projected time is known before hours of runs
        print(study.plan(args.profile, args.seeds, args.data_root, progress=not args.quiet).to_string(index=False))
    for experiment in chosen:
        result = study.run_experiment(experiment, args.profile, args.seeds, args.data_root, progress=not args.quiet)
        print(study.learned(result))
    print(f"results in {study.results_root(args.profile)}")


def cmd_report(args) -> None:
    from . import report

    written = report.build(args.results, args.out)
    print("wrote " + " ".join(str(p) for p in written))


def _table_args(parser) -> None:
    parser.add_argument("--table", required=True, help="images.csv written by prepare")
    parser.add_argument("--data-root", required=True, help="the data root the table's paths are relative to")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _profile_arg(parser) -> None:
    parser.add_argument(
        "--profile",
        default="demo",
        choices=("fixture", "demo", "full"),
        help="the defaults that the flags below override; default demo",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (no usage dump); `--help` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m helpers", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fixture = commands.add_parser("fixture", help="write a synthetic tree in the official C2S layout")
    fixture.add_argument("out_dir", help="where to write the tree (Anno/, Eval/, img/)")
    fixture.add_argument("--items", type=int, default=300, help="items to generate; default 300")
    fixture.add_argument("--seed", type=int, default=0, help="generator seed; default 0")
    fixture.add_argument("--quiet", action="store_true", help="no progress bar")
    fixture.set_defaults(run=cmd_fixture)

    prepare = commands.add_parser("prepare", help="parse the official lists → images.csv + summary.json")
    prepare.add_argument("--data-root", required=True, help="the C2S root holding Anno/, Eval/, img/")
    prepare.add_argument("--out", required=True, help="folder for images.csv, summary.json, bad_images.txt")
    prepare.add_argument("--categories", default="TOPS,DRESSES", help="comma-separated, or 'all'; default TOPS,DRESSES")
    prepare.add_argument(
        "--sample", default=None, help="fractions of train,val,test items to keep (default 0.1,0.02,0.02), or 'all'"
    )
    prepare.add_argument("--resplit", default=None, help="pool the items and re-split by ratio, e.g. 8,1,1")
    prepare.add_argument("--seed", type=int, default=42, help="sampling seed; default 42 (the seed study's)")
    prepare.add_argument("--strict", action="store_true", help="any bad image is an error instead of excluded")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing images.csv in --out")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(run=cmd_prepare)

    train = commands.add_parser("train", help="fit an embedder; writes a run directory")
    _table_args(train)
    train.add_argument("--out", required=True, help="run directory (config.json, history.csv, best.pt, ...)")
    _profile_arg(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    _config_flags(train, TRAIN_OVERRIDES)
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("evaluate", help="Recall@K and mAP of a checkpoint or a zero-shot backbone")
    _table_args(evaluate)
    evaluate.add_argument("--checkpoint", default=None, help="a run's best.pt or last.pt (its preprocessing is used)")
    evaluate.add_argument(
        "--backbone", default=None, help="zero-shot instead: the pooled features of this timm backbone, untrained head"
    )
    evaluate.add_argument(
        "--weights",
        default="auto",
        choices=_choices()["weights"],
        help="zero-shot weights; default auto (hub when reachable, else packaged)",
    )
    evaluate.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="PX",
        help="zero-shot input side; default the backbone's pretrained size",
    )
    evaluate.add_argument("--split", default="test", choices=SPLIT_CHOICES, help="evaluated split; default test")
    evaluate.add_argument(
        "--protocol",
        default="official",
        choices=PROTOCOL_CHOICES,
        help="query/gallery definition (README: protocols); default official",
    )
    evaluate.add_argument("--out", default=None, help="write the full metrics.json here")
    _profile_arg(evaluate)
    _config_flags(evaluate, RUNTIME_OVERRIDES + ("box_margin", "resize", "photometric"))
    evaluate.set_defaults(run=cmd_evaluate)

    index = commands.add_parser("index", help="embed a gallery once and save it for search")
    _table_args(index)
    index.add_argument("--checkpoint", required=True, help="a run's best.pt")
    index.add_argument("--out", required=True, help="index directory (new or empty)")
    index.add_argument(
        "--split",
        default="test",
        choices=SPLIT_CHOICES,
        help="the gallery is the protocol's gallery for this split; default test",
    )
    index.add_argument(
        "--protocol",
        default="official",
        choices=("official", "split"),
        help="gallery definition; default official (val + test shop images)",
    )
    index.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps; default auto")
    index.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers; default 0 on <= 2 cores, else cores - 1 (max 8)",
    )
    ann = index.add_argument_group("search structure (helpers.ann; exact unless --kind says otherwise)")
    ann.add_argument(
        "--kind",
        default="exact",
        choices=("exact", "ivf_flat", "ivf_pq", "hnsw"),
        help="exact (default): chunked exact search; ivf_flat / ivf_pq / hnsw: faiss, for million-image galleries",
    )
    ann.add_argument("--nlist", type=int, default=None, help="IVF lists; default the power of 2 nearest sqrt(n)")
    ann.add_argument("--nprobe", type=int, default=16, help="IVF lists scanned per query; default 16")
    ann.add_argument("--m", type=int, default=32, help="IVF-PQ sub-quantizers (divides the dim); default 32")
    ann.add_argument("--nbits", type=int, default=8, help="IVF-PQ bits per code; default 8")
    ann.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node; default 32")
    ann.add_argument("--ef-construction", type=int, default=40, help="HNSW build candidates; default 40")
    ann.add_argument("--ef-search", type=int, default=64, help="HNSW search candidates; default 64")
    ann.add_argument("--train-size", type=int, default=None, help="IVF/PQ training sample; default 64 x nlist")
    ann.add_argument("--ann-seed", type=int, default=0, help="training sample and k-means seed; default 0")
    ann.add_argument(
        "--recall-queries",
        type=int,
        default=1000,
        help="gallery embeddings used as queries to measure recall@10 vs exact; default 1000",
    )
    index.set_defaults(run=cmd_index)

    stage = commands.add_parser("stage", help="copy + verify + extract the image archive to local disk (Colab)")
    stage.add_argument("source", help="the archive (img.zip) on Drive, or the C2S folder holding it and Anno/, Eval/")
    stage.add_argument("dest", help="local folder (e.g. /content/c2s); becomes the data root for a C2S folder")
    stage.add_argument(
        "--sha256", default=None, help="expected sha256; default <archive>.sha256 beside it, else the source is hashed"
    )
    stage.add_argument("--keep-archive", action="store_true", help="keep the local archive copy after extracting")
    stage.add_argument("--quiet", action="store_true", help="no progress bars")
    stage.set_defaults(run=cmd_stage)

    search = commands.add_parser("search", help="top-k shop images for one consumer photo")
    search.add_argument("--index", required=True, help="an index directory written by `index`")
    search.add_argument("image", help="the consumer photo (any format Pillow reads)")
    search.add_argument("--box", default=None, help="x1,y1,x2,y2 of the garment in the image; default the whole photo")
    search.add_argument("-k", type=int, default=5, help="results to return; default 5")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.set_defaults(run=cmd_search, quiet=True)

    serve = commands.add_parser("serve", help="the live demo (Gradio) over a gallery index, on localhost")
    serve.add_argument("--index", required=True, help="index directory written by `index`")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only")
    serve.add_argument("--data-root", default=None, help="the shop images, if not where the index was built")
    serve.add_argument("--share", action="store_true", help="also open a public Gradio share link (Colab)")
    serve.set_defaults(run=cmd_serve)

    study_ = commands.add_parser("study", help="run / resume one experiment of the study (or a stage, or all)")
    study_.add_argument(
        "experiment",
        help="crop, resize, resolution, augment, margin, photometric, head, loss, "
        "embed_dim, backbone; a stage 02_1, 02_2, 03; or all",
    )
    _profile_arg(study_)
    study_.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1; default demo 2, full 3, fixture 1")
    study_.add_argument("--data-root", default=None, help="the DeepFashion C2S root (profile full; or C2S_DATA_ROOT)")
    study_.add_argument("--quiet", action="store_true", help="no progress bars")
    study_.set_defaults(run=cmd_study)

    report_ = commands.add_parser("report", help="rebuild report/ (markdown, HTML, slides, figures) from results/")
    report_.add_argument("--results", default=None, help="the results folder; default results/")
    report_.add_argument("--out", default=None, help="the report folder; default report/")
    report_.set_defaults(run=cmd_report)

    demo = commands.add_parser("demo", help="the offline demo: synthetic data, prepared table, summary, figure")
    demo.add_argument("--profile", default="demo", choices=("fixture", "demo"), help="default demo")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # argparse prints its one-line reason (e.g. an unknown choice) and exits 2; --help exits 0
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from .repro import tune_allocator

    tune_allocator()  # every command that embeds or trains gains from it (see repro.tune_allocator)
    try:
        args.run(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
