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


def cmd_fixture(args) -> None:
    from . import synthetic

    counts = synthetic.generate_tree(args.out_dir, n_items=args.items, seed=args.seed, progress=not args.quiet)
    print(json.dumps(counts, indent=2))


def cmd_prepare(args) -> None:
    from . import sampling

    if args.sample is not None and args.resplit is not None:
        raise InputError("choose either --sample or --resplit, not both")
    summary = sampling.prepare(
        args.data_root, args.out,
        categories=sampling.parse_categories(args.categories),
        sample=None if args.resplit else sampling.parse_fractions(args.sample or "0.1,0.02,0.02", "--sample"),
        resplit=sampling.parse_fractions(args.resplit, "--resplit") if args.resplit else None,
        seed=args.seed, strict=args.strict, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(json.dumps({k: summary[k] for k in ("splits", "categories", "dropped_rows", "image_check", "images")}, indent=2))
    print(f"wrote {args.out}/images.csv and {args.out}/summary.json")


TRAIN_OVERRIDES = ("backbone", "weights", "loss", "embed_dim", "epochs", "seed", "lr", "img_size", "augment",
                   "margin", "temperature", "p_items", "k_images", "head", "pooling", "photometric", "box_margin",
                   "resize", "device", "num_workers", "patience", "amp")


def _config(args, names=TRAIN_OVERRIDES):
    from . import config

    overrides = {name: getattr(args, name, None) for name in names}
    return config.get_config(args.profile, data_root=args.data_root, **overrides)


def cmd_train(args) -> None:
    from . import train

    cfg = _config(args)
    result = train.fit(cfg, args.table, args.data_root, args.out, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: result[k] for k in ("recall@1", "recall@5", "recall@10", "map", "best_epoch", "stopped")}))
    print(f"wrote {args.out}/metrics.json (test split, official protocol, best.pt of epoch {result['best_epoch']})")


def cmd_evaluate(args) -> None:
    from . import models, repro, sampling, train

    if (args.checkpoint is None) == (args.backbone is None):
        raise InputError("give either --checkpoint or --backbone (zero-shot), not both and not neither")
    runtime = ("device", "num_workers", "flip_tta")
    if args.checkpoint:
        embedder, cfg = train.load_checkpoint(args.checkpoint)
        cfg = dataclasses.replace(cfg, **{k: getattr(args, k) for k in runtime if getattr(args, k) is not None})
    else:
        cfg = _config(args, runtime + ("box_margin", "resize", "photometric"))
        embedder = models.create_embedder(args.backbone, weights=args.weights, head="pooled", img_size=args.img_size)
    device = repro.resolve_device(cfg.device)
    table = sampling.read_table(args.table)
    result = train.evaluate(cfg, embedder.to(device).eval(), table, args.data_root, split=args.split,
                            protocol=args.protocol, device=device, progress=not args.quiet)
    result["model"] = {**embedder.config, "checkpoint": args.checkpoint}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: result[k] for k in ("protocol", "split", "recall@1", "recall@5", "recall@10", "recall@20",
                                             "map", "n_queries", "n_excluded_queries", "n_gallery")}))


def cmd_index(args) -> None:
    from . import retrieval

    index = retrieval.build_index(args.checkpoint, args.table, args.data_root, args.out, split=args.split,
                                  protocol=args.protocol, device=args.device, num_workers=args.num_workers,
                                  progress=not args.quiet)
    print(f"wrote {args.out}: {index['n_gallery']} gallery images, {index['dim']}-d")


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


def cmd_demo(args) -> None:
    """The offline demo (synthetic data, never presented as DeepFashion): data, zero-shot
    baseline, training, test metrics, index, search."""
    import matplotlib

    matplotlib.use("Agg")
    from . import config, pipeline, sampling

    cfg = config.get_config(args.profile)
    out = pipeline.run_demo(cfg, progress=not args.quiet)
    source = "synthetic data (helpers.synthetic), not DeepFashion" if cfg.data_root is None else str(out["data_root"])
    print(f"profile {cfg.profile}: {source}\ntable {out['table']}")
    print(sampling.split_stats(sampling.read_table(out["table"])).to_string())
    print(f"\ntest split, official protocol (95 % bootstrap intervals), backbone {cfg.backbone}:")
    print(out["comparison"].to_string())
    print(f"\nrun {out['run']}\nindex {out['index']}\nfigures " + " ".join(str(f) for f in out["figures"]))


def _table_args(parser) -> None:
    parser.add_argument("--table", required=True, help="images.csv written by prepare")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fixture = commands.add_parser("fixture", help="write a synthetic tree in the official C2S layout")
    fixture.add_argument("out_dir")
    fixture.add_argument("--items", type=int, default=300)
    fixture.add_argument("--seed", type=int, default=0)
    fixture.add_argument("--quiet", action="store_true", help="no progress bar")
    fixture.set_defaults(run=cmd_fixture)

    prepare = commands.add_parser("prepare", help="parse the official lists → images.csv + summary.json")
    prepare.add_argument("--data-root", required=True)
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--categories", default="TOPS,DRESSES", help="comma-separated, or 'all'")
    prepare.add_argument("--sample", default=None,
                         help="fractions of train,val,test items to keep (default 0.1,0.02,0.02), or 'all'")
    prepare.add_argument("--resplit", default=None, help="pool the items and re-split by ratio, e.g. 8,1,1")
    prepare.add_argument("--seed", type=int, default=42)
    prepare.add_argument("--strict", action="store_true", help="any bad image is an error instead of excluded")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing images.csv in --out")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(run=cmd_prepare)

    train = commands.add_parser("train", help="fit an embedder; writes a run directory")
    _table_args(train)
    train.add_argument("--out", required=True, help="run directory (config.json, history.csv, best.pt, ...)")
    train.add_argument("--profile", default="demo", help="fixture | demo | full: the defaults overridden below")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    for name, kind in (("backbone", str), ("weights", str), ("loss", str), ("embed-dim", int), ("epochs", int),
                       ("seed", int), ("lr", float), ("img-size", int), ("augment", str), ("margin", float),
                       ("temperature", float), ("p-items", int), ("k-images", int), ("head", str),
                       ("pooling", str), ("photometric", str), ("box-margin", float), ("resize", str),
                       ("device", str), ("num-workers", int), ("patience", int), ("amp", str)):
        train.add_argument(f"--{name}", type=kind, default=None)
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("evaluate", help="Recall@K and mAP of a checkpoint or a zero-shot backbone")
    _table_args(evaluate)
    evaluate.add_argument("--checkpoint", default=None)
    evaluate.add_argument("--backbone", default=None, help="zero-shot: pooled features of this timm backbone")
    evaluate.add_argument("--weights", default="auto", help="zero-shot weights: auto | hub | packaged | none")
    evaluate.add_argument("--img-size", type=int, default=None)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--protocol", default="official", help="official | split | seed_pairs")
    evaluate.add_argument("--out", default=None, help="write the full metrics.json here")
    evaluate.add_argument("--profile", default="demo")
    evaluate.add_argument("--flip-tta", action="store_true", default=None, help="average with the flipped image")
    for name, kind in (("box-margin", float), ("resize", str), ("photometric", str), ("device", str),
                       ("num-workers", int)):
        evaluate.add_argument(f"--{name}", type=kind, default=None)
    evaluate.set_defaults(run=cmd_evaluate)

    index = commands.add_parser("index", help="embed a gallery once and save it for search")
    _table_args(index)
    index.add_argument("--checkpoint", required=True)
    index.add_argument("--out", required=True, help="index directory")
    index.add_argument("--split", default="test", help="the gallery is the protocol's gallery for this split")
    index.add_argument("--protocol", default="official")
    index.add_argument("--device", default="auto")
    index.add_argument("--num-workers", type=int, default=2)
    index.set_defaults(run=cmd_index)

    search = commands.add_parser("search", help="top-k shop images for one consumer photo")
    search.add_argument("--index", required=True)
    search.add_argument("image")
    search.add_argument("--box", default=None, help="x1,y1,x2,y2 of the garment in the image")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--json", action="store_true")
    search.set_defaults(run=cmd_search, quiet=True)

    demo = commands.add_parser("demo", help="the offline demo: synthetic data, prepared table, summary, figure")
    demo.add_argument("--profile", default="demo", help="demo (default) or fixture")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
