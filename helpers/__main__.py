"""Command line: ``python -m helpers COMMAND ...`` (the contract is in DESIGN.md).

Every command exits 0 on success and 2 with a one-line ``error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

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


def cmd_demo(args) -> None:
    """The offline demo on the synthetic demo tree (never presented as DeepFashion)."""
    import matplotlib

    matplotlib.use("Agg")
    from . import config, plots, sampling, workspace

    cfg = config.get_config(args.profile)
    root, table_path = workspace.ensure_prepared(cfg)
    table = sampling.read_table(table_path)
    source = "synthetic data (helpers.synthetic)" if cfg.data_root is None else f"data at {root}"
    print(f"profile {cfg.profile}: {source}\ntable {table_path}")
    print(sampling.split_stats(table).to_string())
    figure = cfg.work_dir / "sample_pairs.png"
    plots.plot_pairs(table, root, n_items=4, seed=cfg.seed).savefig(figure, dpi=80)
    print(f"wrote {figure}")


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

    demo = commands.add_parser("demo", help="the offline demo: synthetic data, prepared table, summary, figure")
    demo.add_argument("--profile", default="demo", help="demo (default) or fixture")
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
