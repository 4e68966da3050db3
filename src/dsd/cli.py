"""`python -m dsd ...`: the commands the Snakemake rules call, also for use by hand.

The rules pass each job exactly what its result depends on (`--spec`, JSON) and how to run it (`--options`);
by hand, `--config FILE --row NAME [--seed N --phase P]` resolves the same from a config. Every expected
failure ends as one line on stderr, `dsd: error: ...`, with exit status 2, and leaves no finished-looking
output. Reading a config imports no torch.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import sys
from pathlib import Path

from dsd import paths, prefork
from dsd.config import Config, in_this_job, load_config, table_warnings
from dsd.errors import CheckpointError, ConfigError, DSDError
from dsd.spec import DataSpec, PhaseSpec, RowSpec, RunOptions
from dsd.words import counted


def _config(args) -> Config:
    if not args.config:
        raise ConfigError("give --spec JSON (what the rules pass), or --config FILE with --row NAME")
    return load_config(args.config, sets=args.set or ())


def _row(args) -> str:
    """The row a by-hand command works on (without it the message was "no experiment None")."""
    if args.row is None:
        raise ConfigError("with --config, give --row NAME")
    return args.row


def _options(args, config: Config | None = None, one_process: bool = False) -> RunOptions:
    """The run options: `--options`, else the config's, for a job of one process (`one_process`: an evaluation,
    whose `workers: auto` is not a DDP rank's share) or for a training job."""
    options = _from_json(RunOptions, args.options, "--options") if getattr(args, "options", None) else None
    if options is None and config is not None:
        options = config.one_process_options if one_process else config.options
    options = in_this_job(options or RunOptions(), one_process)
    from dsd.gpus import cpu_isa_env

    pinned = cpu_isa_env(options.cpu_isa, options.device)
    if "torch" not in sys.modules:  # the kernels' instruction set is read when torch starts
        os.environ.update(pinned)
    elif any(os.environ.get(k) != v for k, v in pinned.items()):
        if prefork.in_child:
            _rerun_fresh(pinned)
        print(f"dsd: warning: cpu_isa {options.cpu_isa} not applied: torch started first", file=sys.stderr)
    return options


def _rerun_fresh(environ: dict[str, str]) -> None:
    """A warm interpreter's job whose options pin the CPU's instruction set that the server's torch was not
    started with (a `DSD_PREFORK=1` call by hand; Snakemake sets the pin before the server starts): the same
    command in a fresh interpreter, the same process (pid, streams and signals stay the client's)."""
    os.environ.update(environ, DSD_PREFORK="0")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "dsd", *sys.argv[1:]])


def _from_json(kind, text: str, flag: str = "--spec"):
    """A spec as the rules pass it (JSON); other JSON (`dsd spec`'s output, another kind of spec) is one line
    naming the flag, not a KeyError or TypeError traceback."""
    try:
        return kind.from_json(text)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"{flag}: not a {kind.__name__} as the rules pass it ({type(err).__name__}: {err}); by hand, give "
            "--config FILE --row NAME instead"
        ) from None


def _phase_spec(args, config: Config | None) -> PhaseSpec:
    if args.spec:
        return _from_json(PhaseSpec, args.spec)
    if args.row is None or args.seed is None or args.phase is None:
        raise ConfigError("with --config, give --row, --seed and --phase")
    return config.phase(args.row, args.seed, args.phase)


# ------------------------------------------------------------------------------------------ commands


def cmd_check_config(args) -> None:
    config = load_config(args.file, sets=args.set or ())
    jobs = len(_trained_runs(config))
    for warning in table_warnings(config):
        print(f"dsd: warning: {warning}", file=sys.stderr)
    print(
        f"{', '.join(map(str, args.file))}: ok ({counted(len(config.rows), 'row')}, "
        f"{counted(len(config.seeds), 'seed')}, {counted(jobs, 'training job')})"
    )


def _trained_runs(config: Config) -> set[tuple[str, int, str]]:
    """(row, seed, phase) of every phase the pipeline trains: the rows' own and the dense runs they read (a
    NeuralTalk row's encoder, also when its vision row is not one of `rows:`)."""
    from dsd import tracks

    runs = {(r, s, p) for r in config.rows for s in config.seeds for p in config.row(r).phase_names}
    for name in config.rows:
        row = config.row(name)
        sources = tracks.get(row.track).config.upstream(row).values()
        runs |= {tuple(source) for source in sources if not isinstance(source, str)}
    return runs


def cmd_spec(args) -> None:
    """Print a phase's spec and fingerprint (what its checkpoint depends on)."""
    spec = _phase_spec(args, None if args.spec else _config(args))
    print(json.dumps({"fingerprint": spec.fingerprint, "spec": json.loads(spec.to_json())}, indent=1))


def cmd_prepare(args) -> None:
    from dsd.engine import prepare

    if args.spec:
        exp = _from_json(DataSpec, args.spec).experiment(_options(args))
    else:
        config = _config(args)
        exp = config.row(_row(args)).data_spec().experiment(_options(args, config))
    record = prepare.prepare(exp)
    # with the counts the marker records: an extraction that lost files or classes shows here
    counts = json.dumps(record["summary"], sort_keys=True)
    print(f"prepared {exp.dataset} at {exp.data_dir} (content {record['fingerprint']}): {counts}")


def cmd_features(args) -> None:
    """Captioning: encode every image once with the frozen CNN (a trained vision run, or local VGG-16 weights)."""
    config = None if args.spec else _config(args)
    spec = _from_json(PhaseSpec, args.spec) if args.spec else config.phase(_row(args), 0, "dense")
    options = _options(args, config)  # before torch starts: it pins the kernels torch picks then
    from dsd import tracks
    from dsd.engine import checkpoint, distributed, prepare, resume
    from dsd.tracks.captioning import data, model

    exp = spec.experiment(options)
    if exp.track != "captioning":  # only its data sections have an encoder
        raise ConfigError(f"dsd features encodes a captioning row's images; {spec.row} is a {exp.track} row")
    if exp.data.encoder_row:
        if args.encoder_spec:
            encoder_spec = _from_json(PhaseSpec, args.encoder_spec, "--encoder-spec")
        else:
            encoder_spec = config.phase(exp.data.encoder_row, exp.data.encoder_seed, "dense")
        ckpt = args.encoder_checkpoint or paths.checkpoint(
            paths.run_dir(options.output_dir, encoder_spec.row, encoder_spec.seed, "dense")
        )
        encoder_exp = encoder_spec.experiment(options)
        state = checkpoint.load(ckpt)
        expected = resume.identity(encoder_spec, prepare.data_fingerprint(encoder_exp))
        if (why := resume.mismatch(state.get("identity") or {}, expected)) is not None:
            raise CheckpointError(
                f"{ckpt}: not {encoder_spec.row} seed {encoder_spec.seed}'s dense run of this config ({why}); "
                f"train it first (dsd run --row {encoder_spec.row} --seed {encoder_spec.seed})"
            )
        vision = tracks.get(encoder_exp.track).model.build(encoder_exp, pretrained=False)  # the checkpoint's
        checkpoint.load_model(vision, state, ckpt)
        encoder = model.encoder_from_module(vision)
    else:
        encoder = model.vgg16_encoder(exp)
    device = distributed.resolve_device(options.device)
    print(f"wrote {data.extract_features(exp, encoder.to(device))}")


def cmd_train(args) -> None:
    config = None if args.spec else _config(args)
    spec = _phase_spec(args, config)
    options = _options(args, config)  # before torch starts: it pins the kernels torch picks then
    from dsd import tracks
    from dsd.engine import distributed
    from dsd.engine.trainer import monitor_names, run_phase

    out = Path(args.out) if args.out else paths.run_dir(options.output_dir, spec.row, spec.seed, spec.phase)
    init = args.init
    previous = spec.previous()
    if init is None and previous is not None and not args.spec:
        init = paths.checkpoint(paths.run_dir(options.output_dir, spec.row, spec.seed, previous.phase))
    for stale in (paths.metrics(out), paths.checkpoint(out), paths.evaluation(out)):
        stale.unlink(missing_ok=True)  # never leave a previous result looking current
    metrics = run_phase(spec, out, init=init, options=options, progress=args.progress)
    last = metrics["history"][-1] if metrics["history"] else {"val": {}}
    monitored = monitor_names(tracks.get(spec.track), last["val"])
    shown = ", ".join(f"{k} {v:.2f}" for k, v in monitored.items() if isinstance(v, float))
    if distributed.rank_zero():  # a DDP job's other ranks hold the same metrics
        print(f"{spec.row} seed {spec.seed} {spec.phase} [{spec.fingerprint}]: trained; validation {shown}")


def cmd_evaluate(args) -> None:
    config = None if args.spec else _config(args)
    options = _options(args, config, one_process=True)  # before torch starts: it pins the kernels torch picks
    from dsd import hparams, tracks
    from dsd.engine.evaluation import evaluate_checkpoint

    if args.spec:
        spec = _from_json(PhaseSpec, args.spec)
        try:
            raw_eval = json.loads(args.eval or "{}")
        except json.JSONDecodeError as err:
            raise ConfigError(f"--eval: not JSON ({err})") from None
        eval_section = hparams.parse(tracks.get(spec.track).config.Eval, raw_eval, "eval")
    else:
        from dsd.engine import checkpoint

        row = _row(args)
        saved = checkpoint.load(args.checkpoint).get("identity", {}).get("spec", {})
        seed = args.seed if args.seed is not None else saved.get("seed", 0)
        spec = config.phase(row, seed, args.phase or saved.get("phase", "dense"))
        eval_section = config.row(row).eval
    splits = tuple(args.split) if args.split else ("val", "test")
    result = evaluate_checkpoint(spec, eval_section, args.checkpoint, options, splits, args.any_spec)
    if args.out:
        paths.write_json(
            Path(args.out), result
        )  # written whole, last: its presence means evaluation finished
        shown = "test" if "test" in result else "val"  # `--split val` evaluates no test split
        value = result[shown][result["metric"]]
        print(f"{spec.row} seed {spec.seed} {spec.phase}: {shown} {result['metric']} = {value:.2f}")
    else:  # the per-item outcomes (thousands of numbers) belong in the file, not on the terminal
        print(json.dumps({k: v for k, v in result.items() if k != "test_items"}, indent=1))


def cmd_run(args) -> None:
    """One (row, seed) without Snakemake: data, every phase in order (the control and sweep variants included),
    each followed by its evaluation. What is finished for this spec is kept; an interrupted phase resumes."""
    import argparse

    config = _config(args)
    options, row = _options(args, config), config.row(args.row)  # before torch starts (the kernels' pin)
    eval_options = _options(args, config, one_process=True)
    from dsd import tracks
    from dsd.engine import prepare
    from dsd.engine.evaluation import evaluate_checkpoint
    from dsd.spec import eval_fingerprint

    prepare.ensure(row.data_spec().experiment(options))  # waits for another run preparing it
    _current_features(args, config, row)
    # files whose content no spec holds (weights, image features; a lexicon, an LM): a newer one reruns the
    # phase or evaluation that reads it, as Snakemake decides by their times
    track = tracks.get(row.track).config
    exp = config.experiment(row.name)
    starts_from, evaluation_reads = track.content_inputs(exp).values(), track.eval_inputs(exp)
    trained = set()  # a phase whose starting checkpoint was trained again is trained again too
    for phase in row.phase_names:
        spec = config.phase(args.row, args.seed, phase)
        out = paths.run_dir(options.output_dir, args.row, args.seed, phase)
        done = (paths.recorded(paths.metrics(out), k) for k in ("fingerprint", "data_fingerprint"))
        current = (spec.fingerprint, prepare.data_fingerprint(spec.experiment(options)))
        previous = spec.previous()
        if previous:  # its starting checkpoint trained again, here or since (by `dsd train`, say)
            before = paths.checkpoint(paths.run_dir(options.output_dir, args.row, args.seed, previous.phase))
            restarted = previous.phase in trained or _newer(before, paths.metrics(out))
        else:
            restarted = _any_newer(starts_from, paths.metrics(out))
        if restarted or tuple(done) != current:
            trained.add(phase)
            cmd_train(
                argparse.Namespace(**vars(args) | {"spec": None, "phase": phase, "init": None, "out": None})
            )
        # an eval.json that cannot be read is evaluated again, as a metrics.json that cannot be is trained again
        evaluated = paths.recorded(paths.evaluation(out), "eval_fingerprint") == eval_fingerprint(
            spec, row.eval
        )
        if evaluated and not _any_newer(evaluation_reads, paths.evaluation(out)):
            result = paths.read_json(paths.evaluation(out))
        else:
            result = evaluate_checkpoint(spec, row.eval, paths.checkpoint(out), eval_options)
            paths.write_json(paths.evaluation(out), result)
        print(
            f"{args.row} seed {args.seed} {phase}: test {result['metric']} = {result['test'][result['metric']]:.2f}"
        )


def _current_features(args, config: Config, row) -> Path | None:
    """Captioning's image features for `dsd run`, built when missing or older than what encodes the images (the
    encoder's dense checkpoint, retrained since under the same spec, or a weights file replaced since: either
    encodes differently): as Snakemake decides."""
    import argparse

    from dsd import tracks

    captioning = tracks.get(row.track).config
    features = getattr(captioning, "features_path", None)
    if features is None:
        return None
    path = Path(features(config.experiment(row.name)))
    if row.data.encoder_weights:
        encoder = Path(captioning.encoder_weights(config.experiment(row.name)))
    else:
        options = config.options
        run = paths.run_dir(options.output_dir, row.data.encoder_row, row.data.encoder_seed, "dense")
        current = config.phase(row.data.encoder_row, row.data.encoder_seed, "dense").fingerprint
        if paths.recorded(paths.metrics(run), "fingerprint") != current:
            raise ConfigError(
                f"{row.name} encodes its images with {row.data.encoder_row}'s dense run: "
                f"dsd run --row {row.data.encoder_row} --seed {row.data.encoder_seed} first"
            )
        encoder = paths.checkpoint(run)
    if not path.is_file() or _newer(encoder, path):
        cmd_features(
            argparse.Namespace(
                **vars(args) | {"spec": None, "encoder_spec": None, "encoder_checkpoint": None}
            )
        )
    return path


def _any_newer(sources, target: Path) -> bool:
    return any(_newer(Path(source), target) for source in sources if source)


def _newer(source: Path | None, target: Path) -> bool:
    """Whether `source` was written after `target` (a missing target is older than anything)."""
    if source is None or not source.is_file():
        return False
    return not target.is_file() or source.stat().st_mtime_ns > target.stat().st_mtime_ns


def _rows_and_seeds(args, seeds_needed: bool = True) -> tuple[list[RowSpec], list[int], RunOptions]:
    if args.spec:
        if seeds_needed and not args.seeds:
            raise ConfigError("with --spec, give --seeds")
        rows = [_from_json(RowSpec, text) for text in args.spec]
        return _only_row(rows, args.row), args.seeds, _options(args)
    config = _config(args)
    seeds = args.seeds or list(config.seeds)
    rows = _only_row([config.row(r) for r in config.rows], args.row, config)
    if seeds_needed:  # tables and plots read the runs: by hand, no Snakemake has checked them
        _check_runs_current(config, [row.name for row in rows], seeds)
    return rows, seeds, config.options


def _only_row(rows: list[RowSpec], name: str | None, config: Config | None = None) -> list[RowSpec]:
    """`--row NAME`: that row alone (it was accepted and ignored: every row was tabulated)."""
    if name is None:
        return rows
    chosen = [row for row in rows if row.name == name]
    if not chosen:
        if config is not None:
            return [config.row(name)]  # an experiment left out of `rows:`, or one line naming the known ones
        raise ConfigError(f"--row: no row {name!r} among the specs (have: {', '.join(r.name for r in rows)})")
    return chosen


def _check_runs_current(config: Config, names: list[str], seeds: list[int]) -> None:
    """Every run the tables read records this config's spec (training) and eval settings (evaluation)."""
    from dsd.spec import eval_fingerprint

    for name in names:
        for seed in seeds:
            for phase in config.row(name).phase_names:
                spec = config.phase(name, seed, phase)
                run = paths.run_dir(config.options.output_dir, name, seed, phase)
                for path, key, current in (
                    (paths.metrics(run), "fingerprint", spec.fingerprint),
                    (
                        paths.evaluation(run),
                        "eval_fingerprint",
                        eval_fingerprint(spec, config.row(name).eval),
                    ),
                ):
                    if paths.recorded(path, key) != current:
                        raise DSDError(
                            f"{path}: missing, or of another spec than this config's {name} seed {seed} {phase} "
                            f"(run: dsd run --config ... --row {name} --seed {seed})"
                        )


def cmd_table(args) -> None:
    from dsd.report import tables

    rows, seeds, options = _rows_and_seeds(args)
    out = args.out or str(paths.tables_dir(options.output_dir))
    table = tables.write_tables(rows, seeds, options.output_dir, out)
    print(f"wrote {out}/paper_comparison.csv ({counted(len(table), 'row')})")


def cmd_plots(args) -> None:
    from dsd.report import plots

    rows, seeds, options = _rows_and_seeds(args)
    out = args.out or str(paths.plots_dir(options.output_dir))
    files = plots.write_plots(rows, seeds, options.output_dir, out, args.part)
    print(f"wrote {len(files)} figures to {out}")


def cmd_fidelity(args) -> None:
    """Paper vs this config, row by row and aspect by aspect (computed from the config and the code)."""
    from dsd.report import fidelity

    rows, _, _ = _rows_and_seeds(args, seeds_needed=False)
    frame = fidelity.table(rows)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        frame.to_csv(Path(args.out) / "fidelity.csv", index=False)
        (Path(args.out) / "fidelity.md").write_text(fidelity.markdown(frame))
    print(fidelity.markdown(frame), end="")


def cmd_publish_readme(args) -> None:
    """Write a finished run's results table and the sentences about it into the README (make publish)."""
    import pandas as pd

    from dsd.report import claims

    tables = Path(args.tables)
    comparison = pd.read_csv(tables / "paper_comparison.csv")
    table = (tables / "paper_comparison.md").read_text().strip()
    study = args.section == "study"  # `make study`'s seeds: its own block, sentences then table
    text = claims.paragraph(comparison)
    # a run that differs only in a setting that must not matter (its SETTING file and PROVENANCE.md say which)
    second = tables.parent / ("second_study" if study else "second_run") / "paper_comparison.csv"
    if second.is_file():
        frame = claims.stability(comparison, pd.read_csv(second))
        frame.to_csv(second.parent / "verdict_stability.csv", index=False)
        setting = (second.parent / "SETTING").read_text().strip()
        text += " " + claims.stability_sentence(frame, setting)
    if study:
        claims.fill_readme(Path(args.readme), "study", text + "\n\n" + table)
        print(f"{args.readme}: study table and sentences from {tables}")
        return
    claims.fill_readme(Path(args.readme), "table", table)
    claims.fill_readme(Path(args.readme), "results", text)
    print(f"{args.readme}: results table and sentences from {tables}")


def cmd_keys(args) -> None:
    """Every config key with its type, default and meaning (generated from the typed sections)."""
    from dsd import config, hparams, spec, tracks

    sections = [("top level", config.ConfigKeys, ""), ("experiments.<row>", spec.RowKeys, "")]
    sections += [("experiments.<row>.phases[i]", spec.PhaseEntry, "")]
    for name in tracks.NAMES:
        track = tracks.get(name).config
        sections += [(f"{name}: {s}", getattr(track, s.title()), f"{s}.") for s in ("model", "data", "eval")]
    for title, cls, prefix in sections:
        print(f"\n## {title}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        for key, kind, default, text in hparams.describe(cls, prefix):
            print(f"| `{key}` | {kind} | `{default}` | {text} |")


# ------------------------------------------------------------------------------------------- parser


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key by its dotted path (repeatable): experiments.resnet18.train.batch_size=32",
    )


def _add_source(
    parser: argparse.ArgumentParser,
    what: str = "the job's spec as JSON (what the rules pass)",
    repeat=False,
    row: str = "experiment name in the config, e.g. resnet18",
) -> None:
    parser.add_argument("--spec", help=what, action="append" if repeat else "store")
    parser.add_argument("--options", help="run options as JSON (what the rules pass)")
    parser.add_argument("--config", nargs="+", help="config file(s), instead of --spec (later ones win)")
    _add_set(parser)
    parser.add_argument("--row", help=row)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate config file(s) in depth, without running anything")
    p.add_argument("file", nargs="+", help="config file(s), later ones win")
    _add_set(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("readme", help="write a run's results table and sentences into the README")
    p.add_argument("--tables", default="results/published/tables", help="the tables folder (%(default)s)")
    p.add_argument("--readme", default="README.md", help="the README to write into (%(default)s)")
    p.add_argument("--section", choices=["results", "study"], default="results", help="which README block")
    p.set_defaults(func=cmd_publish_readme)

    p = sub.add_parser("keys", help="print every config key with its type, default and meaning")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("spec", help="print one phase's spec and fingerprint")
    _add_source(p)
    p.add_argument("--seed", type=int, help="with --config: the run's seed")
    p.add_argument(
        "--phase", help="with --config: dense, sparseN, redenseN, control, or a sweep's sparse1_s50, ..."
    )
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("prepare", help="generate an embedded data set or check a real one")
    _add_source(p, "the data set's spec as JSON")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("features", help="captioning: encode the images once with the frozen CNN")
    _add_source(p, "the captioning row's dense phase spec as JSON")
    p.add_argument("--encoder-spec", help="the encoder run's dense phase spec as JSON")
    p.add_argument("--encoder-checkpoint", help="the encoder run's dense model.pt (default: its run folder)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser(
        "train", help="train one phase (dense, sparseN, redenseN, control or a sweep's sparse1_s50, ...)"
    )
    _add_source(p)
    p.add_argument("--seed", type=int, help="with --config: the run's seed")
    p.add_argument(
        "--phase", help="with --config: dense, sparseN, redenseN, control, or a sweep's sparse1_s50, ..."
    )
    p.add_argument("--init", help="checkpoint of the previous phase (default with --config: its run folder)")
    p.add_argument("--out", help="run folder (default: from output_dir)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "run", help="one (row, seed) in order without Snakemake: data, every phase, evaluations"
    )
    p.add_argument("--config", nargs="+", required=True, help="config file(s), later ones win")
    _add_set(p)
    p.add_argument("--row", required=True, help="experiment name in the config, e.g. resnet18")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default: %(default)s)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the validation and test splits")
    _add_source(p)
    p.add_argument("--eval", help="with --spec: the eval section as JSON")
    p.add_argument("--checkpoint", required=True, help="a phase's model.pt")
    p.add_argument("--seed", type=int, help="with --config (default: the checkpoint's)")
    p.add_argument("--phase", help="with --config (default: the checkpoint's)")
    p.add_argument("--split", action="append", choices=["val", "test"], help="default: both")
    p.add_argument("--out", help="write the result here (JSON) instead of printing it")
    p.add_argument("--any-spec", action="store_true", help="evaluate a checkpoint trained for another spec")
    p.set_defaults(func=cmd_evaluate)

    for name, func, what in (
        ("table", cmd_table, "tables from finished runs"),
        ("plots", cmd_plots, "figures from finished runs and the tables"),
        ("fidelity", cmd_fidelity, "the paper vs this config, aspect by aspect (also written by table)"),
    ):
        p = sub.add_parser(name, help=what)
        _add_source(
            p,
            "a row's spec as JSON (repeatable)",
            repeat=True,
            row="only this row (default: the config's rows)",
        )
        p.add_argument(
            "--seeds",
            type=int,
            nargs="+",
            help="seeds to read (default with --config: the config's; needed with --spec)",
        )
        p.add_argument(
            "--out",
            help="also write fidelity.csv and fidelity.md into this folder (default: print only)"
            if name == "fidelity"
            else f"output folder (default: <output_dir>/{'tables' if name == 'table' else name})",
        )
        if name == "plots":
            p.add_argument(
                "--part",
                choices=["all", "summary", "rows"],
                default="all",
                help="summary: gains and curves; rows: each row's weights, captions and sweep (two jobs)",
            )
        p.set_defaults(func=func)
    return parser


def one_line(err: BaseException) -> str:
    """The message of an expected failure in one line; from a DataLoader worker, the worker's own message
    (torch re-raises it as "Caught DataError in DataLoader worker process 0" with the traceback as text)."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text.splitlines()[0] if text else type(err).__name__


# failures a user causes, each one line; with a path naming a file where a folder belongs (output_dir, data_root
# set to a file) or a folder where a file does
EXPECTED = (DSDError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def one_process(command: str) -> None:
    """Only `train` runs as DDP ranks: another command started as several (torchrun) would do the same work in
    each of them and write the same files at once."""
    world = os.environ.get("WORLD_SIZE", "1")
    if command != "train" and world.isdigit() and int(world) > 1:
        raise ConfigError(
            f"dsd {command} runs as one process, not as {world} ranks (WORLD_SIZE={world}); several GPUs per "
            "job: gpus_per_job in the config (Snakemake), or torchrun ... -m dsd train for one phase"
        )


def _reader_gone() -> bool:
    """Whether the pipe that broke is our stdout's (`dsd keys | head`), not one of a job's own: then what is
    left to print goes to /dev/null, so that the interpreter's last flush does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):  # a pipe with no reader left
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        one_process(args.command)
        args.func(args)
    except EXPECTED as err:
        print(f"dsd: error: {one_line(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one anywhere else
        print("dsd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _reader_gone():
            raise
        return 141  # as a command that SIGPIPE ended: the reader of its output (head, less) stopped reading
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"{err.filename}: " if err.filename else ""
        hint = (
            ""
            if err.filename
            else " (the system named no file: see the free space under output_dir and data_root)"
        )
        print(f"dsd: error: {where}{err.strerror}{hint}", file=sys.stderr)
        return 2
    return 0
