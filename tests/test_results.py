"""Statistics of the comparison table on hand-made numbers, and wandb tracking that never stops training."""

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import evaluate, parse, prepare_data, tiny_vision_config, train

from dsd.report.tables import (
    detectable_difference,
    item_differences,
    item_shares,
    joint_confidence,
    paired_ci,
    paired_ci_items,
    paper_headline,
    rel_gain_pct,
    runtime_rows,
    verdict,
)
from dsd.spec import Wandb
from dsd.tracking import Tracker


def test_paired_ci_matches_hand_computation():
    mean, low, high = paired_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half))
    assert all(math.isnan(v) for v in paired_ci([0.7])[1:])


def test_the_detectable_difference_is_detected_80_percent_of_the_time():
    """Simulated paired designs with the reported difference as the true one: the t-test rejects in 80%."""
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(0)
    for differences in ([0.5, -1.2, 2.0], [1.0, 2.0, 3.0, 4.0, 5.5]):
        delta, sd, n = detectable_difference(differences), np.std(differences, ddof=1), len(differences)
        sample = rng.normal(delta, sd, size=(100_000, n))
        t = sample.mean(1) / (sample.std(1, ddof=1) / math.sqrt(n))
        assert (abs(t) > stats.t.ppf(0.975, n - 1)).mean() == pytest.approx(0.8, abs=0.01)
    assert math.isnan(detectable_difference([0.7])) and math.isnan(detectable_difference([1.0, 1.0]))


def test_the_interval_counts_the_test_set_that_all_seeds_share():
    """Seeds x test items, each seed scored on the same items: d = effect + seed + item + noise. Resampling the
    whole design, the seeds-and-items interval covers the true effect about 95% of the time; the seeds' paired
    interval, blind to which items were drawn, far less often (it covered the test set's draw, not DSD's effect)."""
    import numpy as np

    rng = np.random.default_rng(0)
    seeds, items, trials, effect = 3, 400, 2000, 0.1
    covered_items = covered_seeds = 0
    for _ in range(trials):
        # as measured on the embedded vision rows: the test set's draw moves the mean more than the seeds do
        d = (
            effect
            + rng.normal(0, 0.02, (seeds, 1))
            + rng.normal(0, 3.0, (1, items))
            + rng.normal(0, 0.5, (seeds, items))
        )
        _, low, high, _, _ = paired_ci_items(d)
        covered_items += low <= effect <= high
        _, low, high = paired_ci(d.mean(axis=1))
        covered_seeds += low <= effect <= high
    assert covered_items / trials == pytest.approx(0.95, abs=0.02)
    assert covered_seeds / trials < 0.6


def test_interval_over_items_matches_hand_computation():
    import numpy as np
    from scipy import stats

    d = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 3.0]])
    a, b = np.var([1.0, 1.0], ddof=1) / 2, np.var([0.5, 0.0, 1.5, 2.0], ddof=1) / 4  # seed means, item means
    mean, low, high, scale, df = paired_ci_items(d)
    assert (mean, scale, df) == pytest.approx((1.0, math.sqrt(a + b), 3.0))  # no seed spread: the items' df
    assert high - mean == pytest.approx(stats.t.ppf(0.975, 3) * math.sqrt(a + b))
    assert math.isnan(paired_ci_items(d[:1])[1])  # one seed: no interval
    # the detectable difference of the seeds' t-test, given as its scale and df, is the same number
    seeds_only = [0.5, -1.2, 2.0]
    sd = np.std(seeds_only, ddof=1)
    assert detectable_difference(scale=sd / math.sqrt(3), df=2) == detectable_difference(seeds_only)


def test_item_shares_average_to_the_metric_and_pair_only_on_one_test_set():
    import numpy as np

    vision = {"errors": [0, 1, 1, 0]}
    speech = {"errors": [2, 0, 1], "units": [4, 3, 3]}
    assert np.mean(item_shares(vision)) == pytest.approx(50.0)  # top-1 error, percent
    assert np.mean(item_shares(speech)) == pytest.approx(30.0)  # 3 word errors in 10 words
    one = {"test_items": speech}
    other = {"test_items": {"errors": [0, 0, 1], "units": [4, 3, 3]}}
    assert item_differences([one], [other])[0].tolist() == pytest.approx(
        [60.0, 0.0, 0.0]
    )  # 2 errors: 60 x 3 / 10
    assert item_differences([one], [{"test_items": vision}]) is None  # other items: no pairing
    assert item_differences([one], [{"test": {}}]) is None  # an evaluation written before items were kept
    # shares the track computed itself (captioning's linearised BLEU-4) pair with shares only
    bleu = {"test_items": {"shares": [30.0, 10.0, 20.0], "bleu_statistics": {}}}
    other_bleu = {"test_items": {"shares": [25.0, 15.0, 20.0], "bleu_statistics": {}}}
    assert item_differences([bleu], [other_bleu])[0].tolist() == pytest.approx([5.0, -5.0, 0.0])
    assert item_differences([bleu], [one]) is None


def test_joint_intervals_keep_a_whole_table_of_null_rows_free_of_verdicts_95_percent_of_the_time():
    """Seven rows, no true effect in any: read alone, each row's 95% interval gives some row a verdict in about
    30% of tables (1 - 0.95^7); the joint intervals (Bonferroni) in at most 5%."""
    rng = np.random.default_rng(0)
    tables = rng.normal(size=(1000, 7, 10))  # tables x rows x seeds' paired differences
    joint = joint_confidence(7)
    assert joint == pytest.approx(1 - 0.05 / 7) and joint_confidence(1) == 0.95

    def any_verdict(confidence: float) -> float:
        hits = [
            any(paired_ci(row, confidence)[1] > 0 or paired_ci(row, confidence)[2] < 0 for row in t)
            for t in tables
        ]
        return float(np.mean(hits))

    assert 0.24 < any_verdict(0.95) < 0.36
    assert any_verdict(joint) < 0.065


def test_verdict_respects_direction_of_metric():
    assert verdict(-1.5, -0.2, higher_is_better=False) == "DSD better than control"  # error went down
    assert verdict(-1.5, -0.2, higher_is_better=True) == "DSD worse than control"  # BLEU went down
    assert verdict(-0.5, 0.4, higher_is_better=False) == "no significant difference"
    assert verdict(float("nan"), float("nan"), higher_is_better=True) == "too few seeds"


def test_equal_differences_give_no_interval_and_say_why(tmp_path):
    """Two seeds each one test image (1/15 of a point of 1,500) worse: equal steps of a discrete metric, no
    measured spread, so no interval (a zero-width one decided "DSD worse" outright); a NaN is no seed count."""
    from dsd.report.tables import no_interval_reason, write_tables

    assert math.isnan(paired_ci([1 / 15, 1 / 15])[1]) and math.isnan(paired_ci_items(np.full((2, 3), 5.0))[1])
    assert no_interval_reason([1 / 15, 1 / 15]) == "no spread to test"
    assert no_interval_reason([0.7]) == "too few seeds"
    assert no_interval_reason([1.0, float("nan"), 2.0]) == "non-finite values"
    assert verdict(float("nan"), float("nan"), False, "no spread to test") == "no spread to test"
    # the NeuralTalk records: DSD - control is +10 BLEU-4 on both seeds, exactly
    comparison = write_tables([_neuraltalk_records(tmp_path)], [0, 1], str(tmp_path), tmp_path / "tables")
    assert comparison[["verdict", "verdict_row_alone"]].iloc[0].tolist() == ["no spread to test"] * 2


def test_relative_gain_reproduces_the_papers_column():
    paper = paper_headline()
    for row, entry in paper.iterrows():
        gain = rel_gain_pct(entry["paper_baseline"], entry["paper_dsd"], bool(entry["higher_is_better"]))
        assert gain == pytest.approx(entry["paper_rel_gain_pct"], abs=0.06), row


def test_offline_wandb_writes_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    settings = Wandb(mode="offline", project="dsd-test")
    tracker = Tracker(settings, tmp_path, group="resnet18-seed0", job_type="sparse1", name="t")
    assert tracker.run is not None
    tracker.log({"train_loss": 0.5, "val/top1_error_pct": 12.0}, step=1)
    tracker.histograms(torch.nn.Linear(3, 3), ["weight"], step=1)
    tracker.summary({"test/top1_error_pct": 11.0})
    tracker.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = (next(runs[0].glob("run-*.wandb"))).read_bytes()
    for key in (b"train_loss", b"val/top1_error_pct", b"weights/weight", b"test/top1_error_pct", b"sparse1"):
        assert key in records, key


def test_wandb_failure_in_online_mode_does_not_fail_training(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "no-login"))  # no stored credentials either
    config = parse(tiny_vision_config(tmp_path, wandb={"mode": "online", "project": "dsd-test"}))
    prepare_data(config, "resnet18")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(config, "resnet18", 0, "dense", out=tmp_path / "run")
    assert any("wandb disabled for this run" in str(w.message) for w in caught)
    assert metrics["monitor"]["top1_error_pct"] >= 0


def test_runtime_table_sums_snakemake_benchmark_files(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for seed, phase, seconds in [
        (0, "dense", 30.5),
        (0, "sparse1", 12.0),
        (1, "dense", 29.5),
        (2, "dense", 99.0),
    ]:
        folder = tmp_path / "benchmarks" / "rules" / "resnet18" / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{phase}.tsv").write_text(
            header + f"{seconds}\t0:00:30\t800\t5000\t470\t580\t0\t6\t45\t15\n"
        )
    (row,) = runtime_rows(str(tmp_path), ["resnet18", "vgg16"], seeds=[0, 1], cores=2)  # seed 2 not asked
    assert row == {
        "row": "resnet18",
        "jobs": 3,
        "job_minutes": 72.0 / 60,
        "cores": 2,
        "share_of_run_minutes": 0.6,
    }


def test_runtime_table_counts_only_the_phases_of_this_config(tmp_path):
    """A sweep's sparsity dropped from the config left its jobs' benchmark files: the row's runtime summed them
    as this config's cost. Only the row's current phases (training and evaluation) count."""
    folder = tmp_path / "benchmarks" / "rules" / "neuraltalk" / "seed0"
    folder.mkdir(parents=True)
    for name, seconds in [("dense", 60), ("dense.eval", 6), ("sparse1_s80", 30), ("sparse1_s50", 600)]:
        (folder / f"{name}.tsv").write_text(f"s\th:m:s\n{seconds}\t0:00:00\n")
    phases = {"neuraltalk": ["dense", "sparse1_s80"]}
    (row,) = runtime_rows(str(tmp_path), ["neuraltalk"], seeds=[0], cores=1, phases=phases)
    assert (row["jobs"], row["job_minutes"]) == (3, 96 / 60)


def test_the_result_sentences_come_from_the_table(tmp_path):
    from dsd.report import claims

    table = pd.DataFrame(
        {
            "row": ["resnet18", "neuraltalk", "deepspeech"],
            "metric": ["top1_error_pct", "bleu4", "wer_pct"],
            "rel_gain_vs_baseline_pct": [4.0, -1.0, 10.0],
            "verdict": ["no significant difference", "DSD worse than control", "no significant difference"],
            "n_seeds": [3, 3, 3],
            "baseline_greedy_wer_pct_mean": [float("nan"), float("nan"), 88.2],
            "control_mean": [30.0, 20.0, 40.0],
            "detectable_difference": [3.0, 1.0, 8.0],
            "paper_rel_gain_pct": [4.0, 10.0, 6.0],
            "interval_over": ["seeds and test items", "seeds", "seeds and test items"],
        }
    )
    text = claims.paragraph(table)
    assert "over 3 seeds (and over the test items on resnet18 and deepspeech, whose draw" in text
    assert (
        "on 2 of the 3 rows (not on neuraltalk)" in text and "favours the control on 1 (neuraltalk)" in text
    )
    assert "extra epochs at this power" not in text and "WER is 88-88%" in text  # a row favours the control
    assert "from 5% to 20% of the control's value" in text
    assert "on 2 of the 3 rows that is more than the paper's own relative gain" in text  # 10 > 4, 20 > 6
    table["dense_converged"], table["dense_flat_seeds"] = ["yes", "no", "yes"], ["2/3", "0/3", "3/3"]
    text = claims.paragraph(table)
    assert "criterion (the least-squares trend of the seeds' mean validation curve" in text
    assert "on 2 of the 3 rows (resnet18 and deepspeech); single seeds' trends" in text
    assert "met it in 5 of 9 dense runs" in text and "points of chance" not in text
    table["dense_converged"] = ["at chance", "no", "yes"]
    text = claims.paragraph(table)
    assert "on 1 of the 3 rows (deepspeech)" in text
    assert "The dense baseline of resnet18 ended within 5 points of chance" in text
    table["dense_converged"] = ["yes", "no", "yes"]
    table.loc[0, "verdict"] = "DSD better than control"  # a value changes: so does the sentence
    changed = claims.paragraph(table)
    assert "in DSD's favour on 1 row (resnet18)" in changed and "extra epochs at this power" not in changed
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold words\n<!-- results:end -->\nrest\n")
    claims.fill_readme(readme, "results", changed)
    assert changed in readme.read_text() and "old words" not in readme.read_text()
    table = table.assign(
        joint_confidence=1 - 0.05 / 3,
        verdict_row_alone=["DSD better than control", "DSD worse than control", "DSD worse than control"],
        dsd_minus_control_ci95_low=[-0.5, 0.2, 0.1],
        dsd_minus_control_ci95_high=[-0.1, 0.9, 3.0],
    )
    joint = claims.paragraph(table)
    assert "at 95% for the 3 rows together (98.3% each, Bonferroni)" in joint
    assert "read alone, would say otherwise on 1 (deepspeech: DSD worse than control, 0.10 to 3.00)" in joint
    same = claims.paragraph(table.assign(verdict=table["verdict_row_alone"]))
    assert "Each row's own 95% interval gives the same verdicts." in same


def test_a_dense_phase_too_short_to_judge_is_not_said_to_have_failed_the_criterion():
    """dense_converged "too few epochs" (a dense phase shorter than the criterion's window) is no verdict: the
    sentence names those rows instead of counting them among the rows that did not meet it."""
    from dsd.report import claims

    table = pd.DataFrame(
        {
            "row": ["resnet18", "vgg16"],
            "metric": ["top1_error_pct"] * 2,
            "rel_gain_vs_baseline_pct": [4.0, -1.0],
            "verdict": ["no significant difference"] * 2,
            "n_seeds": [3, 3],
            "dense_converged": ["too few epochs", "yes"],
        }
    )
    text = claims.paragraph(table)
    assert "on 1 of the 2 rows (vgg16); not judged on 1 (resnet18: fewer than 4 dense epochs)." in text


def test_verdict_stability_between_two_runs_is_generated():
    from dsd.report import claims

    first = pd.DataFrame(
        {"row": ["a", "b"], "verdict": ["no significant difference", "DSD worse than control"]}
    )
    second = first.assign(verdict=["no significant difference", "no significant difference"])
    frame = claims.stability(first, second)
    assert frame["same"].tolist() == [True, False]
    with_numbers = claims.stability(
        first.assign(dsd_minus_control_mean=[0.1, 0.5]), second.assign(dsd_minus_control_mean=[0.2, 0.3])
    )
    assert with_numbers["dsd_minus_control_mean_second"].tolist() == [0.2, 0.3]
    numbers = {"dsd_minus_control_mean": [0.1, 0.5], "dsd_minus_control_ci95_low": [-0.2, 0.1],
               "dsd_minus_control_ci95_high": [0.4, 0.9]}  # fmt: skip
    flip = claims.stability_sentence(claims.stability(first.assign(**numbers), second.assign(**numbers)), "x")
    assert (
        "b: DSD worse than control (DSD - control +0.50, 0.10 to 0.90) -> no significant difference (" in flip
    )
    text = claims.stability_sentence(frame, "threads: 2")
    assert "same verdict on 1 of the 2 rows (b: DSD worse than control -> no significant difference)" in text
    assert "read them as undecided" in text and "undecided" not in claims.stability_sentence(
        claims.stability(first, first), "threads: 2"
    )
    # joint verdicts agree, each row's own 95% verdicts do not: the sentence says both, with the numbers of each
    joint = {"dsd_minus_control_joint_low": [-0.4, -0.1], "dsd_minus_control_joint_high": [0.6, 1.1]}
    one = first.assign(**numbers, **joint, verdict_row_alone=first["verdict"], verdict=second["verdict"])
    two = second.assign(**numbers, **joint, verdict_row_alone=second["verdict"])
    both = claims.stability(one, two)
    text = claims.stability_sentence(both, "x")
    assert "same verdict on 2 of the 2 rows. Judged by each row's own 95% interval" in text
    assert (
        "would differ on 1 (b: DSD worse than control (DSD - control +0.50, 0.10 to 0.90) -> no sig" in text
    )


def test_a_verdict_that_moves_is_put_down_to_the_setting_the_runs_differ_in_not_to_cpu_arithmetic():
    """Every such sentence said "the per-seed values move with CPU kernel arithmetic", also of two GPU runs or of
    a setting that is no thread count: the comparison knows only the setting (the second run's SETTING file)."""
    from dsd.report import claims

    first = pd.DataFrame({"row": ["a"], "verdict": ["no significant difference"]})
    moved = claims.stability(first, first.assign(verdict="DSD worse than control"))
    text = claims.stability_sentence(moved, "its GPU model (an H200 instead of an H100)")
    assert "differs only in its GPU model (an H200 instead of an H100), a setting that must not" in text
    assert "): the per-seed values move with that setting, and with these seeds" in text
    assert "CPU" not in text


def test_the_study_block_of_the_readme_is_filled_from_its_own_table(tmp_path):
    from dsd.cli import main

    tables = tmp_path / "study"
    tables.mkdir()
    pd.DataFrame(
        {
            "row": ["a"],
            "metric": ["top1_error_pct"],
            "rel_gain_vs_baseline_pct": [1.0],
            "verdict": ["DSD better than control"],
            "n_seeds": [5],
        }
    ).to_csv(tables / "paper_comparison.csv", index=False)
    (tables / "paper_comparison.md").write_text("| row |\n|---|\n| a |\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- table:begin -->\nkept\n<!-- table:end -->\n<!-- study:begin -->\n<!-- study:end -->\n"
    )
    assert main(["readme", "--section", "study", "--tables", str(tables), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "over 5 seeds, at 95%, excludes zero in DSD's favour on 1 row (a)" in text and "| a |" in text
    assert "kept" in text and "A second fresh run" not in text  # the main table's block is left alone
    second = tmp_path / "second_study"  # a second study with a setting that must not matter
    second.mkdir()
    pd.DataFrame({"row": ["a"], "verdict": ["no significant difference"]}).to_csv(
        second / "paper_comparison.csv", index=False
    )
    (second / "SETTING").write_text("its CPU thread count\n")
    assert main(["readme", "--section", "study", "--tables", str(tables), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "differs only in its CPU thread count" in text and "same verdict on 0 of the 1 row " in text
    assert (second / "verdict_stability.csv").is_file()


def test_convergence_is_the_trend_of_the_seeds_mean_validation_curve(tmp_path):
    """A plateau that jitters by a point epoch to epoch is converged; a mean curve still falling 0.6 points per
    epoch is not; seeds whose noise alone tilts their own trends, averaging out, are converged (and counted as
    not flat themselves); a dense phase with no epochs (a pretrained start) is converged by its own training;
    a plateau at chance (vision: a guess among the classes; speech: an empty transcript) is not converged."""
    from dsd import paths
    from dsd.report.tables import dense_convergence

    def write(seed, values, row="r", track="vision", metric="top1_error_pct", higher=False):
        record = {
            "track": track,
            "metric": metric,
            "higher_is_better": higher,
            "spec": {"model": {"num_classes": 10}},
            "history": [{"val": {metric: v}} for v in values],
        }
        paths.write_json(paths.metrics(paths.run_dir(str(tmp_path), row, seed, "dense")), record)

    write(0, [60.0, 30.0, 12.0, 11.0, 12.0, 11.0])  # last epochs jitter by 1 point (9% relative), no trend
    assert dense_convergence(str(tmp_path), "r", [0]) == (pytest.approx(-0.2), "yes", "1/1")
    write(1, [60.0, 30.0, 15.0, 14.0, 13.0, 12.0])  # still falling 1 point per epoch
    assert dense_convergence(str(tmp_path), "r", [0, 1]) == (pytest.approx(-0.6), "no", "1/2")
    write(0, [60.0, 30.0, 12.0, 14.0, 11.0, 10.0], row="noisy")  # own trend -0.9
    write(1, [60.0, 30.0, 11.0, 10.0, 12.0, 13.0], row="noisy")  # own trend +0.8
    assert dense_convergence(str(tmp_path), "noisy", [0, 1]) == (pytest.approx(-0.05), "yes", "0/2")
    write(0, [], row="pretrained")
    assert dense_convergence(str(tmp_path), "pretrained", [0])[1] == "pretrained"
    # flat, but at a guess's level: 10 classes, a chance top-1 error of 90%
    write(0, [90.4, 89.6, 90.2, 89.8, 90.0, 90.2], row="stuck")
    assert dense_convergence(str(tmp_path), "stuck", [0]) == (pytest.approx(0.02), "at chance", "1/1")
    write(0, [90.4, 89.6, 85.0, 84.9, 85.1, 84.8], row="learned")  # 5 points better than chance: it learned
    assert dense_convergence(str(tmp_path), "learned", [0])[1] == "yes"
    write(0, [100.0] * 6, row="blanks", track="speech", metric="wer_pct")  # a CTC model emitting only blanks
    assert dense_convergence(str(tmp_path), "blanks", [0])[1] == "at chance"
    write(0, [2.0] * 6, row="bleu", track="captioning", metric="bleu4", higher=True)  # BLEU: no chance level
    assert dense_convergence(str(tmp_path), "bleu", [0])[1] == "yes"
    # a dense phase too short to judge its trend, at chance all the same: said, not hidden as "too few epochs"
    write(0, [90.0], row="short")
    write(1, [85.0], row="short")
    assert dense_convergence(str(tmp_path), "short", [0, 1])[1:] == ("at chance", "")
    write(1, [80.0], row="short")  # seeds' mean 85: clear of chance
    assert dense_convergence(str(tmp_path), "short", [0, 1])[1:] == ("too few epochs", "")


# Comparison tables of real runs (the publication of 3cc905a: its 3-seed table and the 10-seed second study),
# kept here so that publishing a new run changes no test
TABLES = Path(__file__).parent / "tables"


def _published_comparison(tmp_path):
    """A published 3-seed comparison table, copied so that a test can edit it."""
    (tmp_path / "paper_comparison.csv").write_bytes((TABLES / "comparison_3seeds.csv").read_bytes())
    return pd.read_csv(tmp_path / "paper_comparison.csv")


def test_a_row_without_value_or_interval_is_named_and_left_out_of_the_counts(tmp_path):
    from dsd.report import claims

    table = _published_comparison(tmp_path)
    gone = table["row"] == "deepspeech2"
    table.loc[
        gone, ["rel_gain_vs_baseline_pct", "dsd_minus_control_joint_low", "dsd_minus_control_joint_high"]
    ] = float("nan")
    table.loc[gone, ["verdict", "verdict_row_alone"]] = "too few seeds"
    table.loc[gone, "detectable_difference"] = float("nan")
    text = claims.paragraph(table)
    assert (
        "baseline on 4 of the 6 rows with a value (not on vgg16 and deepspeech; no value on deepspeech2)"
        in text
    )
    assert "includes zero on 6 (googlenet, vgg16, resnet18, resnet50, neuraltalk and deepspeech)" in text
    assert "and has no interval on 1 (deepspeech2: too few seeds)" in text
    assert "on 4 of the 6 rows that is more than the paper's own relative gain" in text


def test_the_extra_epochs_sentence_needs_an_interval_on_every_row_and_no_decided_row(tmp_path):
    from dsd.report import claims

    table = _published_comparison(tmp_path)  # every row: no significant difference, some gains positive
    assert "not distinguishable from the extra epochs at this power" in claims.paragraph(table)
    # a gain on some rows only: the sentence names them, not reading as if DSD gained everywhere
    some = table.assign(rel_gain_vs_baseline_pct=[1.0, -1.0] + [-2.0] * (len(table) - 2))
    assert f"gain over its baseline (on {table['row'][0]}, where it has one) is not" in claims.paragraph(some)
    everywhere = table.assign(rel_gain_vs_baseline_pct=1.0)
    assert "DSD's gain over its baseline is not distinguishable" in claims.paragraph(everywhere)
    one = claims.paragraph(everywhere.assign(n_seeds=1))
    assert "DSD - control over 1 seed " in one and "1 seeds" not in one
    few = table.assign(verdict=["too few seeds"] * len(table))
    worse = table.assign(verdict=["DSD worse than control"] + list(table["verdict"][1:]))
    for other in (few, worse):
        text = claims.paragraph(other)
        assert "extra epochs at this power" not in text and "explained by the extra epochs" not in text


def test_one_seed_claims_no_agreement_of_intervals_it_has_not_got(tmp_path):
    """One seed: no row has an interval, and the sentences said "Each row's own 95% interval gives the same
    verdicts" all the same."""
    from dsd.report import claims

    table = _published_comparison(tmp_path).head(2)
    none = ["dsd_minus_control_joint_low", "dsd_minus_control_joint_high", "detectable_difference"]
    none += ["dsd_minus_control_ci95_low", "dsd_minus_control_ci95_high"]
    one = table.assign(
        n_seeds=1, verdict="too few seeds", verdict_row_alone="too few seeds", **dict.fromkeys(none)
    )
    text = claims.paragraph(one)
    assert "has no interval on 2 (googlenet: too few seeds; vgg16: too few seeds)" in text
    assert "interval gives the same verdicts" not in text and "detectable_difference" not in text
    assert "Each row's own 95% interval gives the same verdicts." in claims.paragraph(table)


def test_one_detectable_size_is_not_given_as_a_range_over_rows(tmp_path):
    """A table of one row (or rows of one size) said "from 17% to 17% of the control's value, depending on the row"."""
    from dsd.report import claims

    table = _published_comparison(tmp_path)
    text = claims.paragraph(table.head(1))
    share = 100 * table["detectable_difference"][0] / table["control_mean"][0]
    assert f"joint test) at {share:.0f}% of the control's value (column `detectable_difference`);" in text
    assert "depending on the row" not in text
    assert "from 4% to 26% of the control's value, depending on the row" in claims.paragraph(table)


def test_a_control_of_zero_gives_no_detectable_share_not_inf(tmp_path):
    """A control whose metric is 0 (BLEU-4 of a captioner that never learned): "from 6% to inf% of the control's
    value", and the row counted among those that could hide the paper's gain."""
    from dsd.report import claims

    table = _published_comparison(tmp_path).head(3)
    table.loc[2, "control_mean"] = 0.0
    text = claims.paragraph(table)
    assert "inf" not in text and "of the control's value, depending on the row" in text
    assert "that is more than the paper's own relative gain" in text and " of the 2 rows that is more" in text


def test_an_interval_end_that_rounds_to_zero_is_printed_on_its_side_of_zero():
    """The ten-seed study's resnet18: own 95% interval 0.0013 to 0.47, "DSD worse"; "0.00 to 0.47" reads as
    touching zero, so the sentences print enough digits to show the side."""
    from dsd.report import claims

    table = pd.read_csv(TABLES / "comparison_3seeds.csv").head(2)
    table = table.assign(
        verdict="no significant difference",
        verdict_row_alone=["DSD worse than control", "no significant difference"],
        dsd_minus_control_ci95_low=[0.001296, -0.2],
        dsd_minus_control_ci95_high=[0.465371, 0.3],
    )
    assert "(googlenet: DSD worse than control, 0.0013 to 0.47)" in claims.paragraph(table)
    # the same row in a second run where its own interval includes zero: the flip is printed with its ends
    frame = claims.stability(table, table.assign(verdict_row_alone="no significant difference"))
    assert "(googlenet: DSD worse than control (DSD - control" in claims.stability_sentence(frame, "x")
    assert ", 0.0013 to 0.47) -> no significant difference" in claims.stability_sentence(frame, "x")


def test_the_baseline_sentence_says_it_compares_point_estimates(tmp_path):
    """No interval of DSD - baseline is computed: the sentence must not read as a tested improvement."""
    from dsd.report import claims

    text = claims.paragraph(_published_comparison(tmp_path))
    assert text.startswith(
        "On the means over seeds (point estimates, not tested), DSD is better than its own dense baseline on 4 of "
        "the 7 rows (not on vgg16, deepspeech and deepspeech2)."
    )


def _neuraltalk_records(output_dir, seeds=(0, 1)):
    """Training and evaluation records of the default config's NeuralTalk row (a 50/80/90% sweep), every
    phase's own: its samples' hypotheses name the phase, and the 50% variant is best on validation."""
    from dsd import paths
    from dsd.config import load_config

    row = load_config("configs/default.yaml").row("neuraltalk")
    for seed in seeds:
        for k, phase in enumerate(row.phase_names):
            val = 30.0 if phase == "redense1_s50" else 20.0 + k
            record = {
                "kind": phase.rstrip("0123456789_s") or phase, "metric": "bleu4", "dataset": "scenes",
                "track": "captioning", "higher_is_better": True, "spec": {"model": {}},
                "target_sparsity": 0.0, "measured_sparsity": 0.0, "epochs": 2, "lr": 1e-3, "wall_seconds": 1.0,
                "history": [{"val": {"bleu4": val}, "train_loss": 1.0}] * 12,  # enough for any phase
            }  # fmt: skip
            run = paths.run_dir(str(output_dir), row.name, seed, phase)
            paths.write_json(paths.metrics(run), record)
            samples = [{"id": "a", "reference": "a cat", "hypothesis": f"said by {phase}"}]
            evaluation = {"metric": "bleu4", "higher_is_better": True, "val": {"bleu4": val},
                          "test": {"bleu4": val + 10 * seed}, "samples": samples}  # fmt: skip
            paths.write_json(paths.evaluation(run), evaluation)
    return row


def test_samples_show_the_phase_that_stands_for_dsd_in_the_comparison(tmp_path):
    from dsd.report.tables import write_tables

    row = _neuraltalk_records(tmp_path)
    comparison = write_tables([row], [0, 1], str(tmp_path), tmp_path / "tables")
    assert comparison["dsd_phase"].tolist() == ["redense1_s50"]
    samples = pd.read_csv(tmp_path / "tables" / "samples_neuraltalk.csv")
    assert samples["dsd"].tolist() == ["said by redense1_s50"]


def test_a_value_the_runs_do_not_give_reads_n_a_not_nan(tmp_path):
    """One seed has no spread, no interval and no detectable size: the markdown table and the report's landing
    page printed them as the number "nan"."""
    from dsd.report.tables import write_tables

    row = _neuraltalk_records(tmp_path, seeds=[0])
    comparison = write_tables([row], [0], str(tmp_path), tmp_path / "tables")
    assert comparison[["dsd_std", "detectable_difference"]].isna().all(axis=None)
    for name in ("paper_comparison.md", "report.rst"):
        text = (tmp_path / "tables" / name).read_text()
        assert "nan" not in text.lower() and "n/a" in text
    line = (tmp_path / "tables" / "paper_comparison.md").read_text().splitlines()[2]
    assert "| too few seeds | n/a " in line


def test_a_row_of_one_phase_is_named_not_failed_on_a_control_no_run_writes(tmp_path):
    """A recipe of the dense phase alone passes the config check and `dsd run` trains it; its table failed with
    "No such file or directory: .../control/eval.json", a run that nothing would ever write."""
    from dsd import paths
    from dsd.errors import ConfigError
    from dsd.report.tables import write_tables

    raw = tiny_vision_config(tmp_path, seeds=[0])
    raw["experiments"]["resnet18"]["phases"] = raw["experiments"]["resnet18"]["phases"][:1]
    config = parse(raw)
    prepare_data(config, "resnet18")
    train(config, "resnet18", 0, "dense")
    run = paths.run_dir(config.options.output_dir, "resnet18", 0, "dense")
    paths.write_json(paths.evaluation(run), evaluate(config, "resnet18", 0, "dense"))
    with pytest.raises(
        ConfigError, match=r"^row resnet18: one phase \(dense\), so no DSD phase and no equal-epoch"
    ):
        write_tables([config.row("resnet18")], [0], config.options.output_dir, tmp_path / "tables")
    assert not (tmp_path / "tables").exists()


def test_the_phases_table_has_every_phase_of_every_run_sweep_variants_too(tmp_path):
    from dsd.report.tables import write_tables

    row = _neuraltalk_records(tmp_path, seeds=[0])
    write_tables([row], [0], str(tmp_path), tmp_path / "tables")
    phases = pd.read_csv(tmp_path / "tables" / "phases.csv")
    assert "redense1_s50" in row.phase_names and phases["phase"].tolist() == row.phase_names
    assert "redense1_s90" in (tmp_path / "tables" / "phases.md").read_text()


def test_a_table_leaves_no_per_row_file_of_an_earlier_config_behind(tmp_path):
    """A row or sweep since left out of the config: its sweep and samples tables went on lying beside the new
    table, and `make publish` copied them as this run's."""
    from dsd.report.tables import write_tables

    tables = tmp_path / "tables"
    tables.mkdir()
    for name in ("sweep_gone.csv", "samples_gone.md", "samples_gone.csv", "notes.txt"):
        (tables / name).write_text("of an earlier run")
    write_tables([_neuraltalk_records(tmp_path, seeds=[0])], [0], str(tmp_path), tables)
    per_row = sorted(p.name for p in tables.glob("s*_*"))
    assert per_row == ["samples_neuraltalk.csv", "samples_neuraltalk.md", "sweep_neuraltalk.csv"]
    assert (tables / "notes.txt").exists()  # not a file tables write: left alone


def test_the_phases_markdown_shows_each_phases_lr_as_written_not_rounded_to_two_decimals(tmp_path):
    """A re-dense LR of 0.001 was printed 0.00 (tabulate read the formatted text as a number again)."""
    from dsd.report.tables import write_tables

    row = _neuraltalk_records(tmp_path, seeds=[0])
    write_tables([row], [0], str(tmp_path), tmp_path / "tables")
    lines = (tmp_path / "tables" / "phases.md").read_text().splitlines()
    lr = [cell.strip() for cell in lines[0].split("|")].index("lr")
    assert {line.split("|")[lr].strip() for line in lines[2:]} == {"0.001"}


def _summary_figures(tmp_path, monkeypatch):
    """The comparison table and the summary figures (by name) of the NeuralTalk records, figures not saved."""
    from dsd import paths
    from dsd.report import plots
    from dsd.report.tables import write_tables

    row = _neuraltalk_records(tmp_path)
    comparison = write_tables([row], [0, 1], str(tmp_path), paths.tables_dir(str(tmp_path)))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figures.append((name, fig)) or [])
    plots.write_plots([row], [0, 1], str(tmp_path), tmp_path / "plots", part="summary")
    return comparison, dict(figures)


def test_the_gains_bars_are_the_tables_gains_of_the_means(tmp_path, monkeypatch):
    """Seed gains 50% and 33% (dense 20 and 30, DSD 30 and 40): the table's gain of the means is 40%, their mean
    42%; the bars must show the table's value."""
    comparison, figures = _summary_figures(tmp_path, monkeypatch)
    ours = figures["gains"].axes[0]
    bars = sorted(bar.get_width() for bar in ours.patches)
    table = sorted(comparison[["rel_gain_vs_baseline_pct", "rel_gain_vs_control_pct"]].iloc[0])
    assert comparison["rel_gain_vs_baseline_pct"].iloc[0] == pytest.approx(40.0)
    assert bars == pytest.approx(table)


def test_plots_read_their_own_rows_of_the_table_and_refuse_another_seed_count(tmp_path, monkeypatch):
    """`dsd plots --row X` after a whole table failed with "zip() argument 2 is longer than argument 1"; plots of
    one seed over a table of two drew the 2-seed means' bars with one seed's dots and curves, unsaid."""
    from dsd import paths
    from dsd.config import load_config
    from dsd.errors import DSDError
    from dsd.report import plots

    comparison, _ = _summary_figures(tmp_path, monkeypatch)
    table = paths.tables_dir(str(tmp_path)) / "paper_comparison.csv"
    pd.concat([comparison.assign(row="other"), comparison]).to_csv(table, index=False)  # another row first
    row = _neuraltalk_records(tmp_path)
    plots.write_plots([row], [0, 1], str(tmp_path), tmp_path / "plots", part="summary")  # its own line
    with pytest.raises(
        DSDError, match="a table of 2 seeds, plots of 1 .seeds 0.: run dsd table with the same"
    ):
        plots.write_plots([row], [0], str(tmp_path), tmp_path / "plots", part="summary")
    comparison.to_csv(table, index=False)
    with pytest.raises(DSDError, match="paper_comparison.csv: no row resnet18 .run dsd table"):
        plots.write_plots(
            [load_config("configs/default.yaml").row("resnet18")], [0, 1], str(tmp_path), tmp_path
        )


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_the_gains_legend_leaves_the_axis_label_readable(tmp_path, monkeypatch, rows):
    """The legend sat 0.13 axes heights under the bars: with one or two rows the axes are short and it covered
    the axis label (positive = better). Seven rows keep the published figure's place."""
    from dsd.report import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figures.append(fig) or [])
    plots.gains(pd.read_csv(TABLES / "comparison_3seeds.csv").head(rows), tmp_path)
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ours = fig.axes[0]
    label, legend = (
        ours.xaxis.label.get_window_extent(renderer),
        ours.get_legend().get_window_extent(renderer),
    )
    assert legend.y1 < label.y0
    assert label.y0 < ours.bbox.y0 and legend.y0 >= 0  # under the axes, inside the figure


def test_the_gains_figure_names_the_data_it_was_measured_on_and_rows_the_paper_has_not(tmp_path, monkeypatch):
    """The figure said "ours: embedded miniatures ... not comparable in size" of a paper configuration's ImageNet
    rows too, and left a row of our own (no paper figure) as an empty space, which reads as a zero gain."""
    from dsd.report import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figures.append(fig) or [])
    table = pd.read_csv(TABLES / "comparison_3seeds.csv")
    plots.gains(table, tmp_path)
    real = {"shapes": "imagenet", "scenes": "flickr8k", "spoken": "wsj"}
    plots.gains(table.assign(dataset=table["dataset"].map(real)), tmp_path)
    mine = table.head(2).assign(row=["resnet18", "mynet"], paper_rel_gain_pct=[4.14, float("nan")])
    plots.gains(mine, tmp_path)
    embedded, paper, own = figures
    assert embedded.axes[0].get_title() == "ours: embedded miniatures"
    assert "not comparable in size" in embedded._suptitle.get_text()
    assert paper.axes[0].get_title() == "ours: imagenet, flickr8k, wsj"
    assert "not comparable" not in paper._suptitle.get_text()
    assert [t.get_text() for t in own.axes[1].texts] == ["not in the paper"]
    assert not embedded.axes[1].texts


def test_the_curves_are_labelled_as_the_training_monitor_not_the_tables_metric(tmp_path, monkeypatch):
    """NeuralTalk's table has beam-search BLEU-4; its curves plot the greedy BLEU-4 of the per-epoch monitor."""
    _, figures = _summary_figures(tmp_path, monkeypatch)
    assert figures["curves"].axes[0].get_ylabel() == "neuraltalk\nmonitor: greedy bleu4"
    from dsd.report.plots import monitor_label

    assert monitor_label("top1_error_pct") == "monitor: top1_error_pct"
    assert monitor_label("wer_pct") == "monitor: greedy wer_pct"


def test_the_sweep_figure_says_its_bars_are_the_seeds_sd(tmp_path, monkeypatch):
    """The sweep's error bars are standard deviations over seeds, not the table's intervals: the legend says so."""
    from dsd.report import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figures.append(fig) or [])
    plots.sweep(_neuraltalk_records(tmp_path), [0, 1], str(tmp_path), tmp_path / "plots")
    labels = figures[0].axes[0].get_legend_handles_labels()[1]
    assert "val: mean, bars SD over seeds" in labels and "test: mean, bars SD over seeds" in labels


def test_figures_of_one_seed_promise_no_band_nor_bars(tmp_path, monkeypatch):
    """One seed has no spread: the legends said "mean of 1 seeds, band min-max" and "bars SD over seeds"."""
    from dsd import paths
    from dsd.report import plots
    from dsd.report.tables import write_tables

    row = _neuraltalk_records(tmp_path, seeds=[0])
    write_tables([row], [0], str(tmp_path), paths.tables_dir(str(tmp_path)))
    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figures.update({name: fig}) or [])
    plots.write_plots([row], [0], str(tmp_path), tmp_path / "plots", part="summary")
    plots.sweep(row, [0], str(tmp_path), tmp_path / "plots")
    curves = [t.get_text() for t in figures["curves"].legends[0].get_texts()]
    assert curves == [
        "DSD (dense > sparse > re-dense ...): one seed, no band",
        "equal-epoch dense control: one seed, no band",
    ]
    sweep = figures["sweep_neuraltalk"].axes[0]
    assert sweep.get_title() == "neuraltalk: metric vs sparsity (1 seed)"
    assert "val: one seed, no bars" in sweep.get_legend_handles_labels()[1]


def test_the_sweep_figure_names_the_phase_its_values_are_after(tmp_path, monkeypatch):
    """A sweep whose recipe ends with its sparse phase was labelled "... after re-dense"."""
    from dsd import paths
    from dsd.report import plots

    raw = tiny_vision_config(tmp_path, seeds=[0])
    raw["experiments"]["resnet18"] |= {
        "phases": raw["experiments"]["resnet18"]["phases"][:2],
        "sweep": [0.3, 0.5],
    }
    row = parse(raw).row("resnet18")
    for sparsity, recipe in row.variants.items():
        run = paths.run_dir(str(tmp_path), "resnet18", 0, recipe.final)
        evaluation = {"metric": "top1_error_pct", "higher_is_better": False}
        paths.write_json(paths.evaluation(run), evaluation | {"val": {"top1_error_pct": 50 + sparsity}} | {
            "test": {"top1_error_pct": 60.0}})  # fmt: skip
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: figures.append(fig) or [])
    plots.sweep(row, [0], str(tmp_path), tmp_path)
    assert figures[0].axes[0].get_ylabel() == "top1_error_pct after sparse"
    plots.sweep(_neuraltalk_records(tmp_path), [0, 1], str(tmp_path), tmp_path)
    assert figures[1].axes[0].get_ylabel() == "bleu4 after re-dense"


def test_stability_names_rows_missing_from_a_run_and_unequal_seed_counts():
    """A published 3-seed table against a 10-seed study with its resnet18 row dropped."""
    from dsd.report import claims

    first = pd.read_csv(TABLES / "comparison_3seeds.csv")
    second = pd.read_csv(TABLES / "comparison_10seeds.csv")
    second = second[second["row"] != "resnet18"]
    frame = claims.stability(first, second)
    assert frame["row"].tolist() == first["row"].tolist()  # the first run's order, missing rows kept
    text = claims.stability_sentence(frame, "x")
    assert "of the 6 rows in both runs" in text
    assert "resnet18 is only in the first run" in text
    assert "the first run has 3 seeds per row, the second 10" in text


def test_stability_against_a_run_without_intervals_prints_no_nan_and_blames_no_arithmetic(tmp_path):
    """A one-seed run beside a two-seed one: the sentence printed "(DSD - control -5.00, nan to nan)", "1 seeds",
    and put the verdicts' difference down to CPU kernel arithmetic, where one run had no interval at all."""
    from dsd.report import claims

    second = _published_comparison(tmp_path).head(2)
    none = ["dsd_minus_control_joint_low", "dsd_minus_control_joint_high"]
    none += ["dsd_minus_control_ci95_low", "dsd_minus_control_ci95_high"]
    first = second.assign(n_seeds=1, verdict="too few seeds", verdict_row_alone="too few seeds")
    first = first.assign(**dict.fromkeys(none, float("nan")))
    text = claims.stability_sentence(claims.stability(first, second), "x")
    assert "nan" not in text and "the first run has 1 seed per row, the second 3" in text
    assert "(googlenet: too few seeds (DSD - control +0.24, no interval) -> no significant difference" in text
    assert "googlenet and vgg16 had no interval in one of the runs, so no verdict to hold" in text
    assert "move with that setting" not in text


def test_runtime_divides_by_the_cores_this_process_may_use(tmp_path, monkeypatch):
    """A job limited to 2 of a machine's 8 cores (taskset, a cgroup's cpuset) shares 2 cores, not 8."""
    import os

    folder = tmp_path / "benchmarks" / "rules" / "resnet18" / "seed0"
    folder.mkdir(parents=True)
    (folder / "dense.tsv").write_text("s\th:m:s\n120.0\t0:02:00\n")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    (row,) = runtime_rows(str(tmp_path), ["resnet18"], seeds=[0])
    assert row["cores"] == 2 and row["share_of_run_minutes"] == 1.0


def test_the_landing_page_says_how_the_intervals_are_computed(tmp_path):
    """The published rows' intervals count seeds and test items with Welch degrees of freedom, not a paired
    t over seeds; a table without per-item outcomes keeps the paired t wording."""
    from dsd.report.tables import landing_page

    table = _published_comparison(tmp_path)
    text = " ".join(landing_page(table, pd.DataFrame(), "Words.").split())
    assert "the verdict uses intervals of DSD - control over seeds and test items" in text
    assert "Welch-Satterthwaite" in text and "per-seed difference" not in text
    seeds_only = " ".join(landing_page(table.drop(columns="interval_over"), pd.DataFrame(), "W.").split())
    assert "paired t-intervals of the per-seed difference DSD - control" in seeds_only


def test_the_readme_does_not_say_dense_phases_train_until_they_flatten():
    """Dense phases train a fixed number of epochs; flatness is checked afterwards (dense_converged)."""
    from pathlib import Path

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "trained until its validation curve flattens" not in readme
    assert "every dense phase trains a fixed number of epochs" in readme


def test_every_deviation_of_the_embedded_default_gives_its_reason_and_reasons_change_no_run():
    from dataclasses import replace

    from dsd.config import load_config
    from dsd.report import fidelity

    config = load_config("configs/default.yaml")
    rows = [config.row(name) for name in config.rows]
    verdicts = fidelity.table(rows)["verdict"]
    assert not verdicts.str.contains(fidelity.NO_REASON, regex=False).any()
    resnet18 = config.phase("resnet18", 0, "redense1")  # a reason is no part of what a run depends on
    assert config.row("resnet18").fidelity and "fidelity" not in resnet18.identity()
    assert replace(config.row("resnet18"), fidelity={}).data_spec().fingerprint == (
        config.row("resnet18").data_spec().fingerprint
    )


@pytest.mark.parametrize("folder", ["tables", "study"])
def test_the_published_fidelity_text_is_what_the_code_and_configs_say_now(folder):
    """The published fidelity table and the landing page's copy of it are generated: a paper fact or a reason
    edited in the code or the configs (GoogLeNet's prototxt crop, say) left the published text stale."""
    from conftest import REPO

    from dsd.config import load_config
    from dsd.report import claims, fidelity
    from dsd.report.tables import landing_page

    published = REPO / "results" / "published" / folder
    config = load_config(REPO / "configs" / "default.yaml")
    frame = fidelity.table([config.row(name) for name in config.rows])
    assert fidelity.markdown(frame) == (published / "fidelity.md").read_text()
    comparison = pd.read_csv(published / "paper_comparison.csv")
    page = landing_page(comparison, pd.read_csv(published / "fidelity.csv"), claims.paragraph(comparison))
    assert page == (published / "report.rst").read_text()


def test_a_count_of_one_is_said_in_the_singular(tmp_path):
    """Said "1 rows", "1 seeds", "1 training jobs", "on 1 of the 1 rows", "sparse 1 epochs": the counts of a one-row,
    one-seed config and of one-epoch phases were followed by a plural noun."""
    from conftest import dsd_cli, write_config

    from dsd.config import load_config
    from dsd.report import claims, fidelity

    config = tiny_vision_config(tmp_path, seeds=[0])
    config["experiments"]["resnet18"]["phases"][1]["epochs"] = 1
    result = dsd_cli("check-config", str(write_config(tmp_path, config)))
    assert result.returncode == 0 and "ok (1 row, 1 seed, 4 training jobs)" in result.stdout, result.stdout
    config["experiments"]["resnet18"]["phases"] = config["experiments"]["resnet18"]["phases"][:1]
    result = dsd_cli("check-config", str(write_config(tmp_path, config)))
    assert result.returncode == 0 and "ok (1 row, 1 seed, 1 training job)" in result.stdout, result.stdout
    text = claims.paragraph(_published_comparison(tmp_path).head(1))
    assert text.count(" of the 1 row") == 3 and " 1 rows" not in text
    default = load_config("configs/default.yaml", sets=["experiments.resnet18.phases.1.epochs=1"])
    ours = fidelity.table([default.row("resnet18")])["ours"]
    assert ours.str.contains("sparse 1 epoch at 0.01").any() and not ours.str.contains("1 epochs").any()


def test_the_captioning_parameter_count_says_its_tokens_include_our_special_ones():
    """NeuralTalk's count read "(with Flickr8k's 2,538-word vocabulary)", where the model it counts has 2,538
    tokens in all, our 4 special tokens (<pad>, <start>, <end>, <unk>) among them: 2,534 words."""
    from dsd.config import load_config
    from dsd.report import fidelity
    from dsd.tracks.captioning.data import SPECIALS
    from dsd.tracks.captioning.model import ShowAndTell

    row = load_config("configs/default.yaml").row("neuraltalk")
    frame = fidelity.table([row])
    (ours,) = frame[frame["aspect"] == "parameters"]["ours"]
    with torch.device("meta"):
        model = ShowAndTell(4096, 2538, row.model.embed_dim, row.model.hidden_dim, 0.0)
    count = sum(p.numel() for p in model.parameters())
    assert (
        ours.startswith(f"{count:,} (2,538 tokens, our {len(SPECIALS)} special ones included")
        and "word" not in ours
    )
