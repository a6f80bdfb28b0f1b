"""Command line: ``python -m helpers COMMAND ...`` (README: the CLI in brief; docs/design.md: its contract).

Every command exits 0 on success and 2 with a one-line ``error: ...`` on bad input. The flags
that set config fields come from :class:`helpers.core.config.Config` (its fields' help, choices
and per-profile defaults) and the index's from :class:`helpers.evaluation.ann.AnnParams`, so a
new field gets its flag. Building the parser imports neither torch nor pandas (``--help`` is
instant); each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from helpers.core import config
from helpers.core.errors import InputError
from helpers.core.files import write_text_atomic
from helpers.evaluation.ann import KINDS, AnnParams
from helpers.evaluation.postprocess import METHODS, create_postprocess

SPLIT_CHOICES = ("train", "val", "test")  # helpers.core.schema.SPLITS, without importing pandas for --help
# helpers.evaluation.metrics.PROTOCOLS and RENAMED_PROTOCOLS (old names still accepted, with a
# note), named here because metrics imports torch; tests/test_cli.py checks that they agree.
PROTOCOLS = ("official", "split", "original_pairs")
RENAMED_PROTOCOLS = {"seed_pairs": "original_pairs"}
# An index holds a gallery of unique shop images, which the pair-row protocol does not have.
INDEX_PROTOCOLS = ("official", "split")
# helpers.evaluation.gallery.RUNTIMES (what embeds: PyTorch or the ONNX export under onnxruntime),
# named here because gallery imports torch; tests/test_cli.py checks that they agree.
RUNTIMES = ("torch", "onnx")
# Every config field a training run's flags may set: all but the profile (its own flag) and the
# data fields (a run reads the prepared table it is given).
TRAIN_FIELDS = tuple(
    f.name for f in dataclasses.fields(config.Config) if f.name != "profile" and f.name not in config.DATA_FIELDS
)
# `index --seed` would read as the model's seed: the index's own seed keeps its prefix.
ANN_FLAG_NAMES = {"seed": "ann_seed"}
FLAG_TYPES = {"int": int, "int | None": int, "float": float, "str": str}


def cmd_fixture(args) -> None:
    from helpers.data import synthetic

    counts = synthetic.generate_tree(args.out_dir, n_items=args.items, seed=args.seed, progress=not args.quiet)
    print(json.dumps(counts, indent=2))


def cmd_prepare(args) -> None:
    from helpers.data import sampling

    if args.sample is not None and args.resplit is not None:
        raise InputError("choose either --sample or --resplit, not both")
    profile = config.PROFILES[args.profile]
    if args.resplit is not None:
        sample, resplit = None, sampling.parse_fractions(args.resplit, "--resplit")
    elif args.sample is not None:
        sample, resplit = sampling.parse_fractions(args.sample, "--sample"), None
    else:  # the profile's; a re-split wins over a sample, as in artifacts.ensure_prepared
        sample, resplit = (None, profile.resplit) if profile.resplit else (profile.sample, None)
    categories = profile.categories if args.categories is None else sampling.parse_categories(args.categories)
    seed = profile.split_seed if args.seed is None else args.seed
    config.check(dataclasses.replace(profile, categories=categories, sample=sample, resplit=resplit, split_seed=seed))
    summary = sampling.prepare(
        args.data_root,
        args.out,
        categories=categories,
        sample=sample,
        resplit=resplit,
        seed=seed,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        json.dumps({k: summary[k] for k in ("splits", "categories", "dropped_rows", "image_check", "images")}, indent=2)
    )
    print(f"wrote {args.out}/images.csv and {args.out}/summary.json")


def _config(args, names) -> config.Config:
    overrides = {name: getattr(args, name) for name in names}
    return config.get_config(args.profile, data_root=args.data_root, **overrides)


def cmd_train(args) -> None:
    from helpers.training import train

    cfg = _config(args, TRAIN_FIELDS)
    train.fit(cfg, args.table, args.data_root, args.out, resume=args.resume, progress=not args.quiet)
    result = train.evaluate_run(args.out, args.table, args.data_root, progress=not args.quiet)
    from helpers.modeling import distributed

    if not distributed.current().is_main:  # under torchrun: rank 0 reports for all
        return
    print(json.dumps({k: result[k] for k in ("recall@1", "recall@5", "recall@10", "map", "best_epoch", "stopped")}))
    print(f"wrote {args.out}/metrics.json (test split, official protocol, best.pt of epoch {result['best_epoch']})")


# Flags of a zero-shot evaluation that a checkpoint decides for itself.
ZERO_SHOT_ONLY = ("weights", "img_size", *config.PREPROCESSING_FIELDS)


def cmd_evaluate(args) -> None:
    from helpers.core import runtime, schema
    from helpers.evaluation import inference
    from helpers.modeling import checkpoints

    if (args.checkpoint is None) == (args.backbone is None):
        raise InputError("give either --checkpoint or --backbone (zero-shot), not both and not neither")
    given = [_flag(name) for name in ZERO_SHOT_ONLY if getattr(args, name) is not None]
    if args.checkpoint and given:
        raise InputError(f"{given[0]} is for a zero-shot evaluation (--backbone): a checkpoint brings its own")
    if args.backbone and args.postprocess != "none":
        raise InputError("--postprocess is for a checkpoint: a zero-shot row ranks by plain cosine")
    table = schema.read_table(args.table)
    progress = not args.quiet
    if args.checkpoint:
        method = create_postprocess(args.postprocess)
        embedder, cfg = checkpoints.load_embedder(args.checkpoint)
        overrides = {k: getattr(args, k) for k in config.EVALUATION_FIELDS if getattr(args, k) is not None}
        cfg = config.check(dataclasses.replace(cfg, **overrides))
        device = runtime.resolve_device(cfg.device)
        result = inference.evaluate(
            cfg,
            embedder.to(device),
            table,
            args.data_root,
            split=args.split,
            protocol=args.protocol,
            device=device,
            progress=progress,
            interval=args.interval,
            postprocess=method,
        )
        result["model"] = {**embedder.config, "checkpoint": args.checkpoint}
    else:
        profile = _config(args, (*config.EVALUATION_FIELDS, *config.PREPROCESSING_FIELDS))
        cfg = config.check(
            dataclasses.replace(profile, backbone=args.backbone, weights=args.weights or "auto", img_size=args.img_size)
        )
        result = inference.evaluate_zero_shot(
            cfg,
            table,
            args.data_root,
            split=args.split,
            protocol=args.protocol,
            progress=progress,
            interval=args.interval,
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    shown = ("protocol", "split", "recall@1", "recall@5", "recall@10", "recall@20", "map")
    print(json.dumps({k: result[k] for k in (*shown, "n_queries", "n_excluded_queries", "n_gallery")}))


def _ann_params(args) -> AnnParams:
    return AnnParams(
        **{f.name: getattr(args, ANN_FLAG_NAMES.get(f.name, f.name)) for f in dataclasses.fields(AnnParams)}
    )


def cmd_export(args) -> None:
    from helpers.modeling import export

    record = export.export_onnx(args.checkpoint, args.out, args.table, args.data_root, n_check=args.check_images)
    check = record["check"]
    print(
        f"wrote {args.out} and {args.out}.json: {record['backbone']}, {record['embed_dim']}-d, input "
        f"{'x'.join(map(str, record['input']['shape'][1:]))}; onnxruntime = PyTorch on {check['images']} images "
        f"of the table (min cosine {check['min_cosine']:.7f})"
    )


def cmd_index(args) -> None:
    from helpers.evaluation import gallery

    if args.onnx and args.runtime != "onnx":
        raise InputError("--onnx is the model of --runtime onnx: add --runtime onnx")
    ann = _ann_params(args)
    index = gallery.build_index(
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
        postprocess=create_postprocess(args.postprocess),
        runtime=args.runtime,
        onnx_model=args.onnx,
    )
    recall = index["ann"].get("recall_at_10")
    print(
        f"wrote {args.out}: {index['n_gallery']} gallery images, {index['dim']}-d, {args.kind} search, "
        f"post-processing {args.postprocess}, embedded with {args.runtime}"
        + (
            f", recall@10 vs exact {recall:.3f} on {index['ann']['recall_queries']} gallery queries"
            if args.kind != "exact" and recall is not None
            else ""
        )
    )


def cmd_stage(args) -> None:
    from helpers.data import staging

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
    from helpers.evaluation.retriever import Retriever

    box = _parse_box(args.box) if args.box else None
    # The live demo's search too: a path is decoded as it decodes an upload (EXIF orientation applied).
    results = Retriever.load(args.index, runtime=args.runtime).search(args.image, box=box, k=args.k)
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
    """The live demo on this machine (helpers.apps.app); Ctrl-C stops it."""
    from helpers.apps import app

    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be 1..65535, got {args.port}")
    app.serve(
        args.index, port=args.port, host=args.host, data_root=args.data_root, share=args.share, runtime=args.runtime
    )


def cmd_demo(args) -> None:
    """The offline demo (synthetic data, never presented as DeepFashion): data, zero-shot
    baseline, training, test metrics, index, search."""
    import matplotlib

    matplotlib.use("Agg")
    from helpers.core import schema
    from helpers.data import sampling
    from helpers.experiments import pipeline

    recipe = config.get_config(args.profile)
    tree = config.DEMO_TREE.get(args.profile, {})
    cfg = config.get_config(args.profile, epochs=args.epochs or config.DEMO_EPOCHS[args.profile], **tree)
    out = pipeline.run_demo(cfg, progress=not args.quiet)
    source = (
        "synthetic data (helpers.data.synthetic), not DeepFashion" if cfg.data_root is None else str(out["data_root"])
    )
    if tree:
        source += f", the demo's own {cfg.synthetic_items}-item tree (the study's has {recipe.synthetic_items})"
    print(f"profile {cfg.profile}: {source}\ntable {out['table']}")
    print(sampling.split_stats(schema.read_table(out["table"])).to_string())
    schedule = f"at most {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}"
    if cfg.epochs < recipe.epochs:
        schedule += f", a shorter schedule than the recipe's {recipe.epochs} (the study's runs train until val "
        schedule += "Recall@5 levels off)"
    print(f"\ntrained {schedule}")
    print(f"test split, official protocol (95 % bootstrap intervals over items), backbone {cfg.backbone}:")
    print(out["comparison"].to_string())
    print(f"\nrun {out['run']}\nindex {out['index']}\nfigures " + " ".join(str(f) for f in out["figures"]))


def cmd_study(args) -> None:
    """The study, with SIGTERM (a closing session, `kill`) handled like Ctrl-C: the run being trained
    records the wall time it spent (study_run.json) and resumes from its last epoch next time."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _study(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _study(args) -> None:
    """Run (reuse, resume) an experiment, a stage or the whole study and print each result; or the
    post-processing experiment; or the power calculator."""
    from helpers.core.files import portable_path
    from helpers.experiments import catalogue, postprocessing
    from helpers.experiments.study import Study, learned

    if args.experiment == "power":
        cmd_power(args)
        return
    study = Study(
        args.profile, root=args.results, data_root=args.data_root, n_seeds=args.seeds, progress=not args.quiet
    )
    if args.experiment == "robustness":  # on the crop and photometric experiments' runs: no training
        from helpers.experiments import robustness_study

        tables = robustness_study.run_robustness(study)
        print(tables["differences"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {portable_path(study.root / robustness_study.ROBUSTNESS)}")
        return
    if args.experiment == "plan":
        plan = study.write_power_plan(args.noise, args.interim)
        print(f"components: {plan.components_from.iloc[0]}")
        print(
            plan.drop(columns=[c for c in plan.columns if c.startswith("var_") or c == "components_from"]).to_string(
                index=False
            )
        )
        print(f"wrote {portable_path(study.root / 'power_plan.csv')}")
        return
    if args.experiment == catalogue.POSTPROCESS:  # on the final configuration's runs: no training
        result = postprocessing.restate(study) if args.statistics_only else postprocessing.run_postprocess(study)
        if result is None:
            raise InputError(f"{study.root / catalogue.POSTPROCESS}: no committed per-method ranks to restate")
        print(learned(result))
        return
    if len(catalogue.select(args.profile, args.experiment)) > 1 and not args.statistics_only:
        print(study.plan().to_string(index=False))  # the plan first: the projected time before hours of runs
    # synthetic data: the robustness contrasts' runs are evaluated on the nuisance trees as each finishes
    on_run = None if args.statistics_only or study.config.data_root is not None else partial(_store_robustness, study)
    for result in study.run(args.experiment, train=not args.statistics_only, on_run=on_run):
        print(learned(result))
    restated = postprocessing.restate(study) if args.statistics_only and args.experiment == "all" else None
    if restated is not None:  # post-processing from its committed per-method ranks
        print(learned(restated))
    print(f"results in {portable_path(study.root)}")


def _store_robustness(study, run_dir: Path) -> None:
    """A finished run that a robustness contrast reads: its ranks on the nuisance trees stored now,
    while its checkpoint exists (:func:`helpers.experiments.robustness_study.store_while_checkpoint_exists`)."""
    from helpers.core.files import portable_path
    from helpers.experiments import robustness_study

    said = robustness_study.store_while_checkpoint_exists(study, run_dir)
    if said is not None:
        print(f"robustness: {portable_path(run_dir)}: {said}", flush=True)


def cmd_power(args) -> None:
    """The minimum detectable Recall@5 difference for seeds × val items, from the variance
    components of the profile's committed study (its noise.csv), or of a running study's finished
    experiments (``--interim``)."""
    from helpers.core.files import portable_path, write_text_atomic
    from helpers.experiments import artifacts, catalogue, family

    components, source = family.planning_components(args.profile, args.noise, args.interim)
    noise = args.noise or artifacts.results_root(args.profile) / family.NOISE
    print(
        f"variance components of a paired val Recall@5 difference (profile {args.profile}, {source}): "
        f"seed {components.seed:.3g}, item {components.item:.3g}, seed x item {components.interaction:.3g}"
    )
    seeds = args.seeds_list or ([args.seeds] if args.seeds else list(range(3, 9)))
    if args.family:
        m, whose = args.family, ""
    elif args.interim is not None:
        m, whose = sum(catalogue.planned_tests(args.profile).values()), " (the profile's planned primary tests)"
    else:
        m, whose = family.family_size(noise), " (the committed study's)"
    print(f"Holm's family: {m} Recall@5 tests{whose}")
    plan = family.power_plan(components, seeds, args.items, m, args.target)
    print(plan.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, plan.to_csv(index=False, lineterminator="\n"))
        print(f"wrote {portable_path(args.out)}")


def cmd_report(args) -> None:
    from helpers.core import runtime
    from helpers.core.files import portable_path
    from helpers.reporting import compose, render

    written = compose.build(args.results, args.out, prose=args.prose)
    print("wrote " + " ".join(portable_path(p) for p in written))
    if render.chromium_installed():
        print("PDFs: " + " ".join(portable_path(p) for p in render.render_pdfs(written[0].parent)))
    else:
        print(f"PDFs not printed: {runtime.CHROMIUM} not found (apt-get install chromium)", file=sys.stderr)


# --------------------------------------------------------------------------- flags


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (no usage dump); `--help` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _protocol(name: str) -> str:
    """--protocol's type: a renamed protocol's old name becomes its new one, with a note."""
    if name in RENAMED_PROTOCOLS:
        print(f"note: protocol {name!r} is now called {RENAMED_PROTOCOLS[name]!r}", file=sys.stderr)
        return RENAMED_PROTOCOLS[name]
    return name


def _profile_defaults(name: str, base: str = "demo", shown: Callable[[object], str] = str) -> str:
    """``160 (fixture 64, full None)``: the ``base`` profile's value, then the profiles that differ."""
    values = {profile: shown(getattr(cfg, name)) for profile, cfg in config.PROFILES.items()}
    others = ", ".join(f"{p} {v}" for p, v in values.items() if p != base and v != values[base])
    return values[base] + (f" ({others})" if others else "")


def _listed(value) -> str:
    """A prepare flag's spelling of a config value: ``TOPS,DRESSES``, ``0.1,0.02,0.02``; None is all."""
    return "all" if value is None else ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)


def _field_flag(parser, field: dataclasses.Field, flag: str, **options) -> None:
    """The flag of a dataclass field: on/off for a bool, else a value of the field's type."""
    if field.type in ("bool", bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        return
    if str(field.type) not in FLAG_TYPES:
        raise TypeError(f"no flag type for field {field.name}: {field.type}")
    parser.add_argument(flag, type=FLAG_TYPES[str(field.type)], **options)


def _config_flags(parser, names) -> None:
    """One flag per config field, with its help, its choices and its default per profile; every
    default is None so that only the flags given override the chosen --profile."""
    fields = {f.name: f for f in dataclasses.fields(config.Config)}
    for name in names:
        help_text = f"{fields[name].metadata['help']}; default {_profile_defaults(name)}"
        _field_flag(parser, fields[name], _flag(name), default=None, choices=config.CHOICES.get(name), help=help_text)


def _ann_flags(parser) -> None:
    """One flag per AnnParams field, with its help and its default."""
    for field in dataclasses.fields(AnnParams):
        name = ANN_FLAG_NAMES.get(field.name, field.name)
        default = "" if field.default is None else f"; default {field.default}"
        choices = KINDS if field.name == "kind" else None
        help_text = field.metadata["help"] + default
        _field_flag(parser, field, _flag(name), dest=name, default=field.default, choices=choices, help=help_text)


def _field_help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(config.Config) if f.name == name)


def _table_args(parser) -> None:
    parser.add_argument("--table", required=True, help="images.csv written by prepare")
    parser.add_argument("--data-root", required=True, help="the data root the table's paths are relative to")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _profile_arg(parser, default: str = "demo", choices: tuple[str, ...] = tuple(config.PROFILES)) -> None:
    parser.add_argument(
        "--profile", default=default, choices=choices, help=f"the defaults of the flags below; default {default}"
    )


# --------------------------------------------------------------------------- commands


def _add_fixture(commands) -> None:
    demo = config.PROFILES["demo"]
    fixture = commands.add_parser("fixture", help="write a synthetic tree in the official C2S layout")
    fixture.add_argument("out_dir", help="where to write the tree (Anno/, Eval/, img/)")
    fixture.add_argument(
        "--items", type=int, default=demo.synthetic_items, help=f"items to generate; default {demo.synthetic_items}"
    )
    fixture.add_argument(
        "--seed", type=int, default=demo.synthetic_seed, help=f"generator seed; default {demo.synthetic_seed}"
    )
    fixture.add_argument("--quiet", action="store_true", help="no progress bar")
    fixture.set_defaults(run=cmd_fixture)


def _add_prepare(commands) -> None:
    prepare = commands.add_parser(
        "prepare",
        help="parse the official lists → images.csv + summary.json",
        description="Without flags, the profile's data selection; the full profile's is the original study's.",
    )
    prepare.add_argument("--data-root", required=True, help="the C2S root holding Anno/, Eval/, img/")
    prepare.add_argument("--out", required=True, help="folder for images.csv, summary.json, bad_images.txt")
    _profile_arg(prepare, default="full")
    defaults = {name: _profile_defaults(name, "full", _listed) for name in ("categories", "sample")}
    defaults["resplit"] = _profile_defaults(
        "resplit", "full", lambda ratios: "off" if ratios is None else _listed(ratios)
    )
    defaults["seed"] = _profile_defaults("split_seed", "full")
    prepare.add_argument("--categories", help=f"comma-separated, or 'all'; default {defaults['categories']}")
    prepare.add_argument(
        "--sample", help=f"fractions of train,val,test items kept, or 'all'; default {defaults['sample']}"
    )
    prepare.add_argument(
        "--resplit", help=f"pool the items, re-split them by ratio (8,1,1); default {defaults['resplit']}"
    )
    prepare.add_argument("--seed", type=int, help=f"seed of the item sampling; default {defaults['seed']}")
    prepare.add_argument("--strict", action="store_true", help="any bad image is an error instead of excluded")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing images.csv in --out")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(run=cmd_prepare)


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="fit an embedder; writes a run directory")
    _table_args(train)
    train.add_argument("--out", required=True, help="run directory (config.json, history.csv, best.pt, ...)")
    _profile_arg(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    _config_flags(train, TRAIN_FIELDS)
    train.set_defaults(run=cmd_train)


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="Recall@K and mAP of a checkpoint or a zero-shot backbone")
    _table_args(evaluate)
    evaluate.add_argument("--checkpoint", help="a run's best.pt or last.pt (with its model and preprocessing)")
    evaluate.add_argument("--split", default="test", choices=SPLIT_CHOICES, help="evaluated split; default test")
    evaluate.add_argument(
        "--protocol",
        default="official",
        type=_protocol,
        choices=PROTOCOLS,
        help="query/gallery definition (docs/design.md: protocols); default official",
    )
    evaluate.add_argument(
        "--interval",
        default="items",
        choices=("items", "queries"),
        help="what the 95 %% bootstrap intervals resample: items (default; all queries of an item together, "
        "as photos of one garment are not independent) or single queries (narrower, too narrow)",
    )
    _postprocess_arg(evaluate, "rank with this post-processing (helpers.evaluation.postprocess); default none")
    evaluate.add_argument("--out", help="write the full metrics.json here")
    _profile_arg(evaluate)
    _config_flags(evaluate, config.EVALUATION_FIELDS)
    zero_shot = evaluate.add_argument_group("zero-shot evaluation (instead of --checkpoint)")
    zero_shot.add_argument("--backbone", help="the pooled features of this timm backbone, no trained head")
    zero_shot.add_argument(
        "--weights", choices=config.WEIGHT_SOURCES, help="default auto (hub when reachable, else packaged)"
    )
    zero_shot.add_argument(
        "--img-size", type=int, metavar="PX", help="input side; default the backbone's pretrained size"
    )
    _config_flags(zero_shot, config.PREPROCESSING_FIELDS)
    evaluate.set_defaults(run=cmd_evaluate)


def _add_index(commands) -> None:
    index = commands.add_parser("index", help="embed a gallery once and save it for search")
    _table_args(index)
    index.add_argument("--checkpoint", required=True, help="a run's best.pt")
    index.add_argument("--out", required=True, help="index directory (new or empty)")
    index.add_argument(
        "--split", default="test", choices=SPLIT_CHOICES, help="the protocol's gallery of this split; default test"
    )
    index.add_argument(
        "--protocol",
        default="official",
        choices=INDEX_PROTOCOLS,
        help="gallery definition; default official (val + test shop images)",
    )
    _postprocess_arg(
        index,
        "post-processing every search applies, recorded in index.json; default none (dba and k_reciprocal: "
        "dense over the gallery, for demo-size galleries)",
    )
    index.add_argument("--device", default="auto", help=f"{_field_help('device')}; default auto")
    index.add_argument("--num-workers", type=int, help=_field_help("num_workers"))
    _runtime_arg(index, "what embeds the gallery")
    index.add_argument(
        "--onnx",
        metavar="MODEL",
        help="with --runtime onnx: an export of --checkpoint (`export`); default: the checkpoint exported now",
    )
    ann = index.add_argument_group("search structure (helpers.evaluation.ann; exact unless --kind says otherwise)")
    _ann_flags(ann)
    ann.add_argument(
        "--recall-queries",
        type=int,
        default=1000,
        help="gallery embeddings used as queries to measure recall@10 vs exact; default 1000",
    )
    index.set_defaults(run=cmd_index)


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export",
        help="a checkpoint's embedder to ONNX + its preprocessing (model.onnx.json), checked with onnxruntime",
    )
    export.add_argument("--checkpoint", required=True, help="a run's best.pt")
    export.add_argument("--out", required=True, help="the ONNX file (….onnx); its sidecar is written beside it")
    export.add_argument("--table", required=True, help="images.csv: the check embeds some of its images")
    export.add_argument("--data-root", required=True, help="the data root the table's paths are relative to")
    export.add_argument(
        "--check-images", type=int, default=8, help="images the check embeds with both runtimes; default 8"
    )
    export.set_defaults(run=cmd_export)


def _runtime_arg(parser, what: str) -> None:
    parser.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help=f"{what}: torch (default) or onnx (the checkpoint's ONNX export, on onnxruntime, CPU)",
    )


def _add_stage(commands) -> None:
    stage = commands.add_parser("stage", help="copy + verify + extract the image archive to local disk (Colab)")
    stage.add_argument("source", help="the archive (img.zip) on Drive, or the C2S folder holding it and Anno/, Eval/")
    stage.add_argument("dest", help="local folder (e.g. /content/c2s); becomes the data root for a C2S folder")
    stage.add_argument(
        "--sha256", help="expected sha256; default <archive>.sha256 beside it, else the source is hashed"
    )
    stage.add_argument("--keep-archive", action="store_true", help="keep the local archive copy after extracting")
    stage.add_argument("--quiet", action="store_true", help="no progress bars")
    stage.set_defaults(run=cmd_stage)


def _postprocess_arg(parser, help_text: str) -> None:
    parser.add_argument(
        "--postprocess",
        default="none",
        choices=tuple(METHODS),
        metavar="NAME",
        help=f"{help_text}; one of {', '.join(METHODS)}",
    )


def _add_search(commands) -> None:
    search = commands.add_parser(
        "search", help="top-k shop images for one consumer photo (with the index's post-processing)"
    )
    search.add_argument("--index", required=True, help="an index directory written by `index`")
    search.add_argument("image", help="the consumer photo (any format Pillow reads)")
    search.add_argument(
        "--box",
        help="x1,y1,x2,y2 of the garment, in pixels of the upright photo (as a viewer shows it); default the whole photo",
    )
    search.add_argument("-k", type=int, default=5, help="results to return; default 5")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _runtime_arg(search, "what embeds the photo")
    search.set_defaults(run=cmd_search, quiet=True)


def _add_serve(commands) -> None:
    serve = commands.add_parser("serve", help="the live demo (Gradio) over a gallery index, on localhost")
    serve.add_argument("--index", required=True, help="index directory written by `index`")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only")
    serve.add_argument("--data-root", help="the shop images, if not where the index was built")
    serve.add_argument("--share", action="store_true", help="also open a public Gradio share link (Colab)")
    _runtime_arg(serve, "what embeds each query")
    serve.set_defaults(run=cmd_serve)


def _add_study(commands) -> None:
    study = commands.add_parser("study", help="run / resume one experiment of the study (or a stage, or all)")
    study.add_argument(
        "experiment",
        help="crop, resize, resolution, augment, margin, photometric, head, loss, "
        "embed_dim, backbone, batch, length, data_size; a stage 02_1, 02_2, 03; all; postprocess (flip TTA, "
        "query expansion, re-ranking on the final configuration's runs, after the study); power (the power "
        "calculator: the minimum detectable Recall@5 difference for --seeds and --items from the committed "
        "noise.csv); plan (the study's power plan, power_plan.csv, written once before its runs); or robustness "
        "(the crop and photometric experiments' runs on val trees with each nuisance at several strengths; "
        "synthetic data only)",
    )
    _profile_arg(study)
    seeds = ", ".join(f"{profile} {n}" for profile, n in config.STUDY_SEEDS.items())
    study.add_argument("--seeds", type=int, help=f"seeds 0..N-1; default {seeds}")
    study.add_argument("--data-root", help="the DeepFashion C2S root (profile full; or C2S_DATA_ROOT)")
    study.add_argument("--results", type=Path, help="the study's results folder; default results/<profile>")
    study.add_argument("--quiet", action="store_true", help="no progress bars")
    study.add_argument(
        "--statistics-only",
        action="store_true",
        help="recompute every comparison, decision and noise.csv from the finished runs' val ranks; train nothing "
        "(an unfinished run is an error)",
    )
    power = study.add_argument_group("power (with `study power`; --noise and --interim also with `study plan`)")
    power.add_argument("--seeds-list", type=_int_list, help="several seed counts, e.g. 3,4,5,6 (default 3..8)")
    power.add_argument("--items", type=_int_list, default=[75, 150, 300, 450, 600, 800], help="val items, e.g. 150,300")
    power.add_argument(
        "--family", type=_positive_int, help="tests in Holm's family (default: the committed study's, from noise.csv)"
    )
    power.add_argument("--target", type=float, help="a target MDE: mark the sizes that reach it at Holm's level")
    power.add_argument("--out", type=Path, metavar="CSV", help="also write the table to CSV")
    # One source of the variance components: a finished study's noise.csv or an interim look.
    source = power.add_mutually_exclusive_group()
    source.add_argument(
        "--noise",
        type=Path,
        help="noise.csv whose pooled components plan from, with `study power` or `study plan` "
        "(default results/<profile>/noise.csv)",
    )
    source.add_argument(
        "--interim",
        type=Path,
        metavar="DIR",
        help="plan from the components of the finished experiments in DIR instead (a running study, or an "
        "earlier design of it); effects are not read, so re-sizing the rest from them stays blind to the results",
    )
    study.set_defaults(run=cmd_study)


def _positive_int(text: str) -> int:
    value = _int_list(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value[0]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_report(commands) -> None:
    report = commands.add_parser("report", help="rebuild report/ (markdown, HTML, slides, figures) from results/")
    report.add_argument("--results", help="the results folder; default results/")
    report.add_argument("--out", help="the report folder; default report/")
    report.add_argument("--prose", help="the written sections; default report/prose/, whatever --out is")
    report.set_defaults(run=cmd_report)


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="the offline demo: synthetic data, prepared table, summary, figure")
    _profile_arg(demo, choices=("fixture", "demo"))
    epochs = ", ".join(f"{profile} {n}" for profile, n in config.DEMO_EPOCHS.items())
    demo.add_argument("--epochs", type=_positive_int, help=f"epochs to train at most; default {epochs}")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m helpers", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_fixture,
        _add_prepare,
        _add_train,
        _add_evaluate,
        _add_export,
        _add_index,
        _add_stage,
        _add_search,
        _add_serve,
        _add_study,
        _add_report,
        _add_demo,
    ):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # argparse prints its one-line reason (e.g. an unknown choice) and exits 2; --help exits 0
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from helpers.core.runtime import tune_allocator

    tune_allocator()  # every command that embeds or trains gains from it (see runtime.tune_allocator)
    try:
        args.run(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
