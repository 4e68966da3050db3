"""Run identity: the typed spec, its fingerprints, and config checks in depth (one line naming the key)."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, dsd_cli, snakemake, tiny_vision_config, write_config

from dsd import hparams
from dsd.config import load_config, parse_config
from dsd.errors import ConfigError


def one_error_line(result) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("dsd: error:")]
    assert result.returncode != 0 and len(lines) == 1, result.stdout + result.stderr
    return lines[0]


# Case 7 of the run-identity issue: each bad config stops `dsd check-config` and `snakemake -n` before any job,
# with one line naming the key path.
BAD = {
    "unknown arch": (
        "experiments.resnet18.model.arch",
        "resnet19",
        "model.arch: size mini is one of resnet18",
    ),
    "unknown size": ("experiments.resnet18.model.size", "tiny", "model.size: expected one of full, mini"),
    "width as a word": ("experiments.resnet18.model.width", "sixteen", "model.width: expected an integer"),
    "too few classes": (
        "experiments.resnet18.model.num_classes",
        5,
        "model.num_classes: the shapes data set has 10",
    ),
    "infinite epochs": (
        "experiments.resnet18.phases.0.epochs",
        float("inf"),
        "phases[0].epochs: expected a finite",
    ),
    "no rows": ("rows", [], "config.rows: must not be empty"),
    "duplicate seeds": ("seeds", [0, 0], "config.seeds: 0 is listed twice"),
    "exclude typo": (
        "experiments.resnet18.prune.exclude",
        ["conv1.wieght"],
        "prune.exclude[0]: 'conv1.wieght' matches no",
    ),
    "unknown row": ("rows", ["resnet19"], "config.rows[0]: 'resnet19' is not an experiment"),
    "sparsity NaN": (
        "experiments.resnet18.phases.1.sparsity",
        float("nan"),
        "phases[1].sparsity: expected a finite",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_line_from_check_config_and_snakemake(tmp_path, case):
    from dsd.config import set_dotted

    key, value, message = BAD[case]
    config = tiny_vision_config(tmp_path)
    set_dotted(config, key, value)
    configfile = write_config(tmp_path, config)
    line = one_error_line(dsd_cli("check-config", str(configfile)))
    assert message in line, line
    line = one_error_line(snakemake(tmp_path, configfile, "-n"))
    assert message in line, line
    assert not (tmp_path / "results").exists()  # nothing ran


def test_a_table_row_of_the_dense_phase_alone_is_warned_of_before_training(tmp_path):
    """Such a row passed `dsd check-config` and `snakemake -n` in silence, trained, and only then did `dsd table`
    (the default target) refuse it; it stays accepted (`dsd run` trains a dense model), with one warning line."""
    config = tiny_vision_config(tmp_path)
    config["experiments"]["dense_only"] = config["experiments"]["resnet18"] | {
        "phases": [{"kind": "dense", "epochs": 1, "lr": 0.05}]
    }
    warning = "dsd: warning: config.experiments.dense_only.phases: one phase (dense), so no DSD phase"
    configfile = write_config(tmp_path, config)  # rows: [resnet18], the dense row left out
    for result in (dsd_cli("check-config", str(configfile)), snakemake(tmp_path, configfile, "-n")):
        assert result.returncode == 0 and "dsd: warning" not in result.stderr, result.stderr[-2000:]
    del config["rows"]  # every experiment
    configfile = write_config(tmp_path, config)
    for result in (dsd_cli("check-config", str(configfile)), snakemake(tmp_path, configfile, "-n")):
        lines = [line for line in result.stderr.splitlines() if line.startswith("dsd: warning")]
        assert result.returncode == 0 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith(warning), lines[0]
    assert not (tmp_path / "results").exists()  # nothing ran


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0, 1\nexperiments: {}\n")
    line = one_error_line(dsd_cli("check-config", str(bad)))
    assert f"{bad}:2:12: YAML syntax error" in line


@pytest.mark.parametrize(
    "content, message",
    [
        (b"seeds: [0]\nseeds: [1]\n", ":2:1: YAML syntax error: key 'seeds' given twice in one mapping"),
        (b"a: &x [*x]\n", ": YAML error: an alias refers to itself"),
        (b"\xff\xfeseeds: [0]\n", ": not UTF-8 text (invalid start byte at byte 0)"),
    ],
)
def test_a_config_yaml_would_misread_is_one_line_naming_the_file(tmp_path, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    assert f"{bad}{message}" in one_error_line(dsd_cli("check-config", str(bad)))


def test_a_row_name_yaml_reads_as_a_number_is_one_line_naming_it(tmp_path):
    """`2019:` is an int to YAML: it passed the checks, then `dsd run` and Snakemake stopped with a traceback."""
    config = tiny_vision_config(tmp_path)
    config["experiments"] = {2019: config["experiments"]["resnet18"]}
    del config["rows"]
    line = one_error_line(dsd_cli("check-config", str(write_config(tmp_path, config))))
    assert "config.experiments.2019: a row name is text, YAML read this one as int (quote it: '2019')" in line


def test_set_reaches_a_key_named_as_one_before_it():
    """`--set experiments.0.sweep.0=0.5`: Python keeps one object for each one-character string, and the last
    key was found by identity, so the row `0` itself was replaced by 0.5."""
    from dsd.config import set_dotted

    config = {"experiments": {"0": {"sweep": [0.8]}}}
    set_dotted(config, "experiments.0.sweep.0", 0.5)
    assert config == {"experiments": {"0": {"sweep": [0.5]}}}


def test_a_merge_key_may_override_what_it_merges():
    loaded = hparams.load_yaml_text("base: &b {lr: 1, epochs: 2}\nrow: {<<: *b, lr: 3}\n", "t")
    assert loaded["row"] == {"lr": 3, "epochs": 2}


def test_numbers_as_people_write_them():
    """`1e-3` is a number (PyYAML alone reads it as a string); numbers in strings are read where one is due."""
    assert hparams.load_yaml_text("lr: 1e-3\nx: 1.0e+2\nn: 7", "t") == {"lr": 0.001, "x": 100.0, "n": 7}
    from dsd.spec import PhaseEntry

    entry = hparams.parse(PhaseEntry, {"kind": "dense", "epochs": "2", "lr": "1e-3"}, "p")
    assert entry.epochs == 2.0 and entry.lr == 0.001
    with pytest.raises(ConfigError, match=r"p\.lr: must be > 0, got -1.0"):
        hparams.parse(PhaseEntry, {"kind": "dense", "epochs": 1, "lr": -1}, "p")


def test_the_wrong_key_is_named_not_an_anchor(tmp_path):
    """snakemake --config sparsty_typo=0.3 on the default config: the typo is named (not `_vision_data`)."""
    result = snakemake(tmp_path, REPO / "configs" / "default.yaml", "-n", "--config", "sparsty_typo=0.3")
    assert "config.sparsty_typo: unknown key" in one_error_line(result)


def test_an_override_of_one_row_leaves_rows_sharing_its_yaml_anchor_alone(tmp_path):
    default = REPO / "configs" / "default.yaml"
    as_written = load_config(default, check_models=False)
    batch, lr = as_written.row("googlenet").train.batch_size, as_written.row("googlenet").phases[0].lr
    assert batch != 8 and lr != 0.5
    config = load_config(default, sets=["experiments.resnet18.train.batch_size=8"], check_models=False)
    assert config.row("resnet18").train.batch_size == 8
    assert {config.row(r).train.batch_size for r in ("googlenet", "resnet50")} == {batch}
    nested = {"experiments": {"resnet18": {"train": {"batch_size": "8"}}}}  # as Snakemake's --config gives it
    config = load_config(default, overrides=nested, check_models=False)
    assert config.row("resnet18").train.batch_size == 8 and config.row("googlenet").train.batch_size == batch
    config = load_config(default, sets=["experiments.resnet18.phases.0.lr=0.5"], check_models=False)
    assert config.row("resnet18").phases[0].lr == 0.5 and config.row("googlenet").phases[0].lr == lr


def test_the_readmes_own_model_config_reads_as_written(tmp_path):
    """README, "Your own model and image data": its my.yaml with the `--config 'data={imagefolder: ...}'` its
    comment gives passes every check, the model's constructor argument and `first_conv` included."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(# my\.yaml.*?)```", readme, re.S).group(1)
    assert "--config 'data={imagefolder: /data/flowers}'" in block.splitlines()[0]
    assert "snakemake --cores all " in block.splitlines()[0]  # without --cores Snakemake 9 runs nothing
    (tmp_path / "my.yaml").write_text(block)
    config = load_config(tmp_path / "my.yaml", overrides={"data": {"imagefolder": str(tmp_path / "flowers")}})
    row = config.row("flowers")
    assert config.rows == ("flowers",) and config.seeds == (0, 1, 2)
    assert (row.track, row.dataset, row.model.arch, row.model.args) == (
        "vision", "imagefolder", "mobilenet_v3_small", {"dropout": 0.1}
    )  # fmt: skip
    assert row.phase_names == ["dense", "sparse1", "redense1", "control"]
    assert row.recipe["redense1"].lr == pytest.approx(5e-4)  # 1/10 of the sparse LR


@pytest.mark.parametrize(
    ("arch", "args", "typo"),
    [("mobilenet_v3_small", {"dropout": 0.1, "width_mult": 0.5}, "dropuot"), ("convnext_tiny", {"layer_scale": 1e-6}, "layer_scael")],
)  # fmt: skip
def test_a_misspelt_constructor_argument_is_refused_where_torchvision_would_ignore_it(
    tmp_path, arch, args, typo
):
    """MobileNetV3 and ConvNeXt take **kwargs and drop unknown ones: `args: {dropuot: 0.1}` built the default
    model without a word, though the README says the config check names an argument the model does not take."""
    raw = tiny_vision_config(tmp_path)
    raw["experiments"]["resnet18"]["model"] = {"arch": arch, "num_classes": 10, "args": args}
    raw["experiments"]["resnet18"]["prune"] = {"exclude": ["first_conv"]}
    parse_config(raw)  # the real arguments pass
    raw["experiments"]["resnet18"]["model"]["args"] = {typo: 0.1}
    with pytest.raises(ConfigError, match=f"model: args: {arch} does not take '{typo}'"):
        parse_config(raw)


def test_sweep_values_travel_as_numbers_not_through_phase_names(tmp_path):
    raw = tiny_vision_config(tmp_path)
    raw["experiments"]["resnet18"]["sweep"] = [0.825, 0.501, 0.504]
    config = parse_config(raw)
    row = config.row("resnet18")
    names = row.phase_names
    assert {"sparse1_s82.5", "sparse1_s50.1", "sparse1_s50.4", "redense1_s50.4"} <= set(names)
    assert config.phase("resnet18", 0, "sparse1_s82.5").phases[-1].sparsity == 0.825
    assert config.phase("resnet18", 0, "redense1_s50.1").phases[1].sparsity == 0.501
    fingerprints = {config.phase("resnet18", 0, n).fingerprint for n in names}
    assert len(fingerprints) == len(names)  # every phase its own identity
    raw["experiments"]["resnet18"]["sweep"] = [0.5, 0.5000000001]
    with pytest.raises(ConfigError, match="sweep: two sparsities share the name 's50'"):
        parse_config(raw)


def test_fingerprints_follow_what_a_result_depends_on(tmp_path):
    raw = tiny_vision_config(tmp_path)
    base = parse_config(raw)

    def fp(config, phase):
        return config.phase("resnet18", 0, phase).fingerprint

    options = parse_config(raw | {"threads": 2, "workers": 3, "wandb": {"mode": "online"}, "output_dir": "x"})
    assert all(fp(options, p) == fp(base, p) for p in ("dense", "sparse1", "redense1", "control"))
    changed = json.loads(json.dumps(raw))
    changed["experiments"]["resnet18"]["phases"][1]["sparsity"] = 0.5
    other = parse_config(changed)
    assert fp(other, "dense") == fp(base, "dense") and fp(other, "control") == fp(base, "control")
    assert fp(other, "sparse1") != fp(base, "sparse1") and fp(other, "redense1") != fp(base, "redense1")
    changed["experiments"]["resnet18"]["eval"] = {"batch_size": 7}
    assert fp(parse_config(changed), "sparse1") == fp(other, "sparse1")  # evaluation is not training
    changed["experiments"]["resnet18"]["prune"] = {"exclude": ["conv1.weight", "fc.weight"]}
    assert fp(parse_config(changed), "dense") == fp(base, "dense")  # the dense phase prunes nothing
    assert fp(parse_config(changed), "sparse1") != fp(other, "sparse1")
    assert base.phase("resnet18", 1, "dense").fingerprint != fp(base, "dense")  # the seed


def test_a_key_added_later_renames_no_run_left_at_its_default(tmp_path):
    """`lr_anneal` came after runs were named: at its default it is not part of any fingerprint (written out
    or not), set to another value it is."""
    raw = tiny_vision_config(tmp_path)
    train = raw["experiments"]["resnet18"]["train"]
    base = parse_config(raw).phase("resnet18", 0, "dense")
    assert "lr_anneal" not in base.identity()["train"]
    written = parse_config(raw | {"experiments": {"resnet18": raw["experiments"]["resnet18"] | {
        "train": train | {"lr_anneal": 1.2}}}}).phase("resnet18", 0, "dense")  # fmt: skip
    assert written.fingerprint == base.fingerprint
    other = parse_config(raw | {"experiments": {"resnet18": raw["experiments"]["resnet18"] | {
        "train": train | {"lr_anneal": 1.5}}}}).phase("resnet18", 0, "dense")  # fmt: skip
    assert other.fingerprint != base.fingerprint and other.identity()["train"]["lr_anneal"] == 1.5


def test_the_defaults_of_keys_added_later_never_change():
    """A key left out of fingerprints at its default must keep that default: changing it would change what a
    run of an unchanged name trains."""
    import dataclasses

    from dsd import spec, tracks

    sections = [spec.Train, spec.Prune, spec.PhaseEntry, spec.RunOptions]
    for name in ("vision", "captioning", "speech"):
        config = tracks.get(name).config
        sections += [config.Model, config.Data, config.Eval]
    added = {
        f"{cls.__name__}.{f.name}": f.default
        for cls in sections
        for f in dataclasses.fields(cls)
        if f.metadata.get("added")
    }
    assert added == {"Train.lr_anneal": 1.2, "Data.train_crop": "random_resized"}


def test_every_option_of_every_command_says_what_it_takes_in_its_help():
    """`dsd <command> --help` is what a user reads first: an option listed bare (`--seed SEED`) does not say
    which phases, seeds or files it means, nor its default."""
    from dsd import cli

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    bare = [
        f"dsd {name} {action.option_strings[-1]}"
        for name, parser in commands.items()
        for action in parser._actions
        if action.option_strings and action.dest != "help" and not action.help
    ]
    assert not bare, bare


def test_config_path_imports_no_torch():
    code = (
        "import sys; from dsd import cli, config; "
        f"config.load_config({str(REPO / 'configs' / 'paper.yaml')!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_snakemake_plans_the_paper_config_without_torch(tmp_path):
    """A `torch` that fails to import on the path: the plan still comes out (the pattern check is skipped)."""
    poisoned = tmp_path / "poison" / "torch"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('torch must not be imported to plan')\n")
    env = os.environ | {"PYTHONPATH": str(poisoned.parent), "DSD_CACHE_DIR": str(tmp_path / "cache")}
    data = yaml.safe_dump(
        {"imagenet": str(tmp_path / "in"), "flickr8k": str(tmp_path / "fl")}, default_flow_style=True
    )
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(tmp_path),
        "-n",
        "-q",
        "rules",
    ]
    cmd += [
        "--configfile",
        str(REPO / "configs" / "paper.yaml"),
        "--config",
        f"data={data.strip()}",
        "--cores",
        "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_phase" in result.stdout and "evaluate_phase" in result.stdout
    assert "prune patterns not checked here" in result.stderr


def test_evaluating_a_checkpoint_against_another_spec_says_so(tmp_path):
    from conftest import parse, prepare_data, train

    raw = tiny_vision_config(tmp_path)
    config = parse(raw)
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    ckpt = tmp_path / "results" / "runs" / "resnet18" / "seed0" / "dense" / "model.pt"
    saved = __import__("torch").load(ckpt, weights_only=True)["identity"]
    assert saved["fingerprint"] == config.phase("resnet18", 0, "dense").fingerprint
    raw["experiments"]["resnet18"]["train"]["batch_size"] = 8
    configfile = write_config(tmp_path, raw)
    line = one_error_line(
        dsd_cli("evaluate", "--config", str(configfile), "--row", "resnet18", "--checkpoint", str(ckpt))
    )
    assert "trained for another spec" in line and "train.batch_size: 16 -> 8" in line
    result = dsd_cli(
        "evaluate", "--config", str(configfile), "--row", "resnet18", "--checkpoint", str(ckpt), "--any-spec"
    )
    assert result.returncode == 0 and json.loads(result.stdout)["spec_matches"] is False


def test_prune_pattern_names_cache_does_not_outlive_an_install(tmp_path, monkeypatch):
    """The per-user cache of parameter names: a model that could not be built (timm missing) is built again
    once it can be, and an install or upgrade into site-packages (torchvision, timm) starts a new entry."""
    fake = tmp_path / "fake" / "timm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import torch.nn as nn\n"
        "def is_model(name): return name == 'tiny'\n"
        "def create_model(name, pretrained=False, num_classes=10, **kw):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
    )
    row = {"track": "vision", "dataset": "shapes", "model": {"arch": "timm:tiny", "num_classes": 10}}
    row |= {"prune": {"exclude": ["first_conv"]}, "phases": [{"kind": "dense", "epochs": 1, "lr": 0.1}]}
    configfile = write_config(tmp_path, {"seeds": [0], "experiments": {"t": row}})
    env = os.environ | {"DSD_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "dsd", "check-config", str(configfile)]
    without = subprocess.run(command, capture_output=True, text=True, env=env)
    if without.returncode == 0:
        pytest.skip("timm is installed here")
    assert "needs timm" in without.stderr
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    # an install changes its site-packages folder, and with it the cache entry
    from dsd import tracks

    site_packages = tmp_path / "site-packages"
    site_packages.mkdir()
    monkeypatch.setattr("site.getsitepackages", lambda: [str(site_packages)])
    before = tracks._code_stamp("vision")
    (site_packages / "torchvision-99.dist-info").mkdir()
    assert tracks._code_stamp("vision") != before


def test_a_home_folder_in_paths_is_expanded_as_the_shell_would(tmp_path, monkeypatch):
    """`output_dir: ~/runs` and `data: {imagenet: ~/imagenet}` name folders under the home folder; kept as
    written they became a folder called `~` under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = tiny_vision_config(tmp_path)
    raw.update(output_dir="~/runs", data_root="~/data")
    raw["experiments"]["resnet18"]["dataset"] = "imagenet"
    raw["data"] = {"imagenet": "~/imagenet"}
    config = parse_config(raw, check_models=False)
    assert (config.options.output_dir, config.options.data_root) == (
        str(tmp_path / "runs"),
        str(tmp_path / "data"),
    )
    assert config.row("resnet18").data_path == str(tmp_path / "imagenet")


def test_table_plots_and_fidelity_by_hand_take_only_the_row_asked_for(tmp_path):
    """`--row NAME` was accepted by `dsd table`, `plots` and `fidelity` and ignored: every row was read."""
    default = str(REPO / "configs" / "default.yaml")
    fidelity = dsd_cli("fidelity", "--config", default, "--row", "resnet18")
    assert fidelity.returncode == 0, fidelity.stderr[-2000:]
    rows = {line.split("|")[1].strip() for line in fidelity.stdout.splitlines()[2:]}
    assert rows == {"resnet18"}
    for command in ("table", "plots"):  # no runs yet: the first run it needs is named, and it is resnet18's
        result = dsd_cli(command, "--config", default, "--set", f"output_dir={tmp_path}", "--row", "resnet18")
        assert "runs/resnet18/seed0/dense/metrics.json: missing" in one_error_line(result)
    unknown = dsd_cli("fidelity", "--config", default, "--row", "resnet19")
    assert "no experiment 'resnet19'" in one_error_line(unknown)


@pytest.mark.parametrize("command", [["prepare"], ["features"], ["evaluate", "--checkpoint", "model.pt"]])
def test_a_by_hand_command_without_its_row_says_to_give_one(command):
    """With --config and no --row the line read "config.experiments: no experiment None"."""
    result = dsd_cli(*command, "--config", str(REPO / "configs" / "default.yaml"))
    assert one_error_line(result) == "dsd: error: with --config, give --row NAME"


def test_output_into_a_pipe_its_reader_closed_ends_quietly():
    """`dsd keys | head`: the reader left before the end of the output; that was a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # `head` has read its lines and gone
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dsd", "keys"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == "", result.stderr[-2000:]


def test_options_that_are_not_json_are_one_line_naming_the_flag():
    """`--options` by hand: a JSON error was the line alone ("Expecting value: line 1 column 1 (char 0)")."""
    default = str(REPO / "configs" / "default.yaml")
    result = dsd_cli("prepare", "--config", default, "--row", "resnet18", "--options", "threads=2")
    assert one_error_line(result).startswith("dsd: error: --options: not a RunOptions as the rules pass it")
    spec = json.loads(
        dsd_cli("spec", "--config", default, "--row", "resnet18", "--seed", "0", "--phase", "dense").stdout
    )["spec"]
    result = dsd_cli("evaluate", "--spec", json.dumps(spec), "--eval", "batch_size=8", "--checkpoint", "x.pt")
    assert one_error_line(result).startswith("dsd: error: --eval: not JSON (Expecting value")


def test_a_folder_given_as_the_config_file_is_named_as_a_folder():
    """`dsd check-config configs/` said "configs: config file not found" of a folder that is there."""
    line = one_error_line(dsd_cli("check-config", "configs"))
    assert line == "dsd: error: configs: a folder, not a config file (e.g. configs/default.yaml)"


def test_check_config_counts_the_encoder_run_a_captioning_row_reads():
    """`rows: [neuraltalk]` trains resnet18's seed-0 dense run too (its encoder): 25 jobs, not the 24 it said."""
    default = str(REPO / "configs" / "default.yaml")
    alone = dsd_cli("check-config", default, "--set", "rows=[neuraltalk]")
    assert alone.stdout.strip().endswith("ok (1 row, 3 seeds, 25 training jobs)"), alone.stderr[-2000:]
    every = dsd_cli("check-config", default)  # the encoder's run is one of the rows' own: counted once
    assert every.stdout.strip().endswith("ok (7 rows, 3 seeds, 108 training jobs)"), every.stderr[-2000:]
