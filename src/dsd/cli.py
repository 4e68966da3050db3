"""`python -m dsd ...`: the small command line the Snakemake rules call (and people can call by hand).

Every expected failure (bad config, bad data, bad checkpoint, non-finite loss) ends as one line on stderr,
`dsd: error: ...`, and exit status 2; no output file of the failing step is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsd.config import Experiment, load_config, rows
from dsd.errors import ConfigError, DSDError


def _experiment(args) -> Experiment:
    if args.spec:
        return Experiment.from_json(args.spec)
    if not (args.config and args.row):
        raise ConfigError("give --spec JSON, or --config FILE with --row NAME")
    return Experiment.from_config(load_config(args.config, _overrides(args.set)), args.row)


def _overrides(pairs) -> dict:
    import yaml

    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", help="the experiment as JSON (what the Snakemake rules pass)")
    parser.add_argument("--config", help="a config YAML (with --row), instead of --spec")
    parser.add_argument("--row", help="experiment name in the config, e.g. resnet18")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted)")


def cmd_spec(args) -> None:
    """Print the resolved experiment JSON (what the rules pass with --spec)."""
    print(_experiment(args).to_json())


def cmd_check_config(args) -> None:
    config = load_config(args.file, _overrides(args.set))
    for row in rows(config):
        Experiment.from_config(config, row)
    print(f"{args.file}: ok ({len(rows(config))} experiments)")


def cmd_prepare(args) -> None:
    from dsd import paths, tracks

    exp = _experiment(args)
    track = tracks.get(exp.track)
    if exp.dataset not in track.DATASETS:
        raise ConfigError(
            f"config.experiments.{exp.row}.dataset: {exp.dataset!r} is not a {exp.track} data set "
            f"(known: {', '.join(track.DATASETS)})"
        )
    marker = paths.prepared(exp.data_root, exp.dataset)
    marker.unlink(missing_ok=True)
    summary = track.DATASETS[exp.dataset](exp)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(
        json.dumps({"dataset": exp.dataset, "path": exp.data_dir, "summary": summary}, indent=1)
    )
    print(f"prepared {exp.dataset} at {exp.data_dir}")


def cmd_features(args) -> None:
    """Captioning: encode every image once with a trained vision checkpoint (the frozen CNN)."""
    from dsd import checkpoint, tracks
    from dsd.tracks import captioning
    from dsd.train import resolve_device

    exp = _experiment(args)
    encoder_exp = Experiment.from_json(args.encoder_spec)
    model = tracks.get(encoder_exp.track).build_model(encoder_exp)
    state = checkpoint.load(args.encoder_checkpoint)
    checkpoint.load_model(model, state, args.encoder_checkpoint)
    device = resolve_device(exp.device)
    encoder = captioning.encoder_from_module(model).to(device)
    out = captioning.extract_features(exp, encoder, captioning.data_config(exp).image_size)
    print(f"wrote {out}")


def cmd_train(args) -> None:
    from dsd import paths
    from dsd.train import run_phase

    exp = _experiment(args)
    out = Path(args.out) if args.out else paths.run_dir(exp.output_dir, exp.row, args.seed, args.phase)
    for stale in (paths.metrics(out), paths.checkpoint(out)):  # never leave a previous result looking current
        stale.unlink(missing_ok=True)
    metrics = run_phase(
        exp, args.seed, args.phase, out, init=args.init, progress=None if args.progress else False
    )
    print(
        f"{exp.row} seed {args.seed} {args.phase}: test {metrics['metric']} = {metrics['test'][metrics['metric']]:.2f}"
    )


def cmd_evaluate(args) -> None:
    from dsd import checkpoint, tracks
    from dsd.masks import Pruner
    from dsd.train import resolve_device

    exp = _experiment(args)
    track = tracks.get(exp.track)
    track.check(exp)
    device = resolve_device(exp.device)
    model = track.build_model(exp)
    state = checkpoint.load(args.checkpoint)
    checkpoint.load_model(model, state, args.checkpoint)
    result = {"checkpoint": args.checkpoint, "split": args.split}
    if state.get("pruner"):
        result["sparsity"] = Pruner.from_state_dict(model, state["pruner"]).overall_sparsity()
    result |= track.evaluate(model.to(device), exp, args.split, device)
    print(json.dumps(result, indent=1))


def _experiments_and_seeds(args) -> tuple[list[Experiment], list[int]]:
    if args.spec:
        experiments = [Experiment.from_json(text) for text in args.spec]
        seeds = args.seeds
    else:
        config = load_config(args.config, _overrides(args.set))
        experiments = [Experiment.from_config(config, row) for row in rows(config)]
        seeds = args.seeds or config.get("seeds", [0, 1, 2])
    if not experiments or not seeds:
        raise ConfigError("give --config FILE, or --spec JSON (repeatable) with --seeds")
    return experiments, seeds


def cmd_table(args) -> None:
    from dsd import paths, results

    experiments, seeds = _experiments_and_seeds(args)
    out = args.out or str(paths.tables_dir(experiments[0].output_dir))
    table = results.write_tables(experiments, seeds, out)
    print(f"wrote {out}/paper_comparison.csv ({len(table)} rows)")


def cmd_plots(args) -> None:
    from dsd import paths, plots

    experiments, seeds = _experiments_and_seeds(args)
    out = args.out or str(paths.plots_dir(experiments[0].output_dir))
    print(f"wrote {len(plots.write_plots(experiments, seeds, out))} figures to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("spec", help="print one experiment's resolved JSON")
    _add_experiment_args(p)
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("prepare", help="generate an embedded data set or check a real one")
    _add_experiment_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("features", help="captioning: encode the images with a trained vision checkpoint")
    _add_experiment_args(p)
    p.add_argument("--encoder-spec", required=True, help="the vision experiment's JSON")
    p.add_argument("--encoder-checkpoint", required=True)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("train", help="train one phase (dense, sparseN, redenseN or control)")
    _add_experiment_args(p)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--phase", required=True)
    p.add_argument("--init", help="checkpoint of the previous phase (not for dense)")
    p.add_argument("--out", help="run folder (default: from the config's output_dir)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a split")
    _add_experiment_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.set_defaults(func=cmd_evaluate)

    for name, func, what in (
        ("table", cmd_table, "build results/tables from finished runs"),
        ("plots", cmd_plots, "figures from finished runs and the tables"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("--config", help="a config YAML (all its rows)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE")
        p.add_argument(
            "--spec", action="append", help="an experiment as JSON (repeatable), instead of --config"
        )
        p.add_argument("--seeds", type=int, nargs="+")
        p.add_argument(
            "--out", help=f"output folder (default: <output_dir>/{'tables' if name == 'table' else name})"
        )
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DSDError, ValueError, FileNotFoundError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"dsd: error: {message}", file=sys.stderr)
        return 2
    return 0
