"""Tables from finished runs: our baseline, DSD and equal-epoch control beside the paper's figures.

Gains are signed so that positive always means "better than the reference": for error rates a drop, for
BLEU a rise. The difference DSD - control (same seed, same dense start, same data order) has a t-based
interval over the seeds and, where evaluations kept per-item outcomes, the test items (`paired_ci_items`);
the verdict column says plainly whether DSD beat the control. A table makes one claim per
row, so the verdicts use joint intervals: 95% for all of the table's rows together (Bonferroni), so that chance
alone gives a wrong verdict somewhere in the table at most 5% of the time; each row's own 95% interval is kept
beside it.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats

from dsd import paths, tracks
from dsd.core.schedule import CONTROL
from dsd.errors import ConfigError


def paper_headline() -> pd.DataFrame:
    with resources.files("dsd").joinpath("reference/dsd_paper_headline.csv").open() as f:
        return pd.read_csv(f).set_index("row")


def paper_phases() -> pd.DataFrame:
    with resources.files("dsd").joinpath("reference/dsd_paper_phases.csv").open() as f:
        return pd.read_csv(f)


VERDICT_CONFIDENCE = 0.95


def joint_confidence(rows: int) -> float:
    """Each row's interval level so that all `rows` intervals hold together at VERDICT_CONFIDENCE."""
    return 1.0 - (1.0 - VERDICT_CONFIDENCE) / max(rows, 1)


def read_metrics(output_dir: str, row: str, seed: int, phase: str) -> dict:
    """A phase's training record: per-epoch history, epochs, LR, sparsity, wall time."""
    return paths.read_json(paths.metrics(paths.run_dir(output_dir, row, seed, phase)))


def read_eval(output_dir: str, row: str, seed: int, phase: str) -> dict:
    """A phase's evaluation: validation and test metrics of its final checkpoint, a few test predictions."""
    return paths.read_json(paths.evaluation(paths.run_dir(output_dir, row, seed, phase)))


def rel_gain_pct(reference: float, value: float, higher_is_better: bool) -> float:
    """Relative improvement of `value` over `reference`, in percent (positive = better)."""
    if reference == 0 or not math.isfinite(reference):
        return float("nan")
    change = (value - reference) if higher_is_better else (reference - value)
    return 100.0 * change / abs(reference)


def paired_ci(differences, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval of paired differences; (mean, nan, nan) with fewer than two pairs or no spread
    among them: equal differences (on a metric that moves in steps of one test image, two seeds agree by
    chance) do not show that the spread is zero, and a zero-width interval would decide the verdict outright."""
    d = np.asarray(differences, dtype=float)
    mean = float(d.mean())
    if d.size < 2 or not d.std(ddof=1) > 0:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def paired_ci_items(differences, confidence: float = 0.95) -> tuple[float, float, float, float, float]:
    """Mean of per-item differences (seeds x test items; the metric's difference is each row's mean) and its
    interval with both sources of chance: the seeds and the test set. Every seed is scored on the same test
    items, so the test set's draw is shared by all seeds and the seeds' spread alone does not show it.
    Var(mean) = var(seed means) / S + var(item means) / n, degrees of freedom by Welch-Satterthwaite. Their
    common residual is counted in both terms: where seeds and items add little of their own, up to twice its
    share of the variance (an interval up to 1.4x as wide), conservative and never negative, where the unbiased
    two-way ANOVA estimate can be. Returns (mean, low, high, scale, df)."""
    d = np.asarray(differences, dtype=float)
    seeds, items = d.shape
    mean = float(d.mean())
    if seeds < 2 or items < 2:
        return mean, float("nan"), float("nan"), float("nan"), float("nan")
    by_seed = d.mean(axis=1).var(ddof=1) / seeds
    by_item = d.mean(axis=0).var(ddof=1) / items
    if not by_seed + by_item > 0:  # no spread (or a non-finite value): no interval, as in paired_ci
        return mean, float("nan"), float("nan"), float("nan"), float("nan")
    df = (by_seed + by_item) ** 2 / (by_seed**2 / (seeds - 1) + by_item**2 / (items - 1))
    scale = math.sqrt(by_seed + by_item)
    half = float(stats.t.ppf(0.5 + confidence / 2, df) * scale)
    return mean, mean - half, mean + half, scale, df


def item_shares(items: dict) -> np.ndarray:
    """Each test item's share of the headline metric, so that the metric is their mean: 100 x errors x n /
    total units (vision: top-1 error per image, unit 1; speech: word errors per utterance, units = words), or
    the shares the track computed itself (captioning: BLEU-4 linearised)."""
    if "shares" in items:
        return np.asarray(items["shares"], dtype=float)
    errors = np.asarray(items["errors"], dtype=float)
    units = np.asarray(items["units"], dtype=float) if items.get("units") else np.ones_like(errors)
    return 100.0 * errors * len(errors) / units.sum()


def item_differences(dsd_evals: list[dict], control_evals: list[dict]) -> np.ndarray | None:
    """Seeds x test items: DSD's share minus the control's; None unless every evaluation kept its per-item
    outcomes on one and the same test set (evaluations written before they were kept have none)."""
    pairs = list(zip(dsd_evals, control_evals, strict=True))
    if not all("test_items" in a and "test_items" in b for a, b in pairs):
        return None
    units = {json.dumps(e["test_items"].get("units")) for e in (*dsd_evals, *control_evals)}
    kinds = {"shares" in e["test_items"] for e in (*dsd_evals, *control_evals)}
    shares = [(item_shares(a["test_items"]), item_shares(b["test_items"])) for a, b in pairs]
    if len(units) != 1 or len(kinds) != 1 or len({len(x) for pair in shares for x in pair}) != 1:
        return None
    return np.stack([a - b for a, b in shares])


def detectable_difference(
    differences=None, confidence: float = 0.95, power: float = 0.8, scale: float | None = None, df=None
) -> float:
    """The smallest true mean difference that the test detects with `power` at `confidence` (two-sided),
    taking the observed spread as the true one (noncentral t): of the seeds' paired `differences`, or given
    as the mean's standard error `scale` with `df` degrees of freedom (from `paired_ci_items`)."""
    if scale is None:
        d = np.asarray(differences, dtype=float)
        if d.size < 2 or not d.std(ddof=1) > 0:
            return float("nan")
        df, scale = d.size - 1, d.std(ddof=1) / math.sqrt(d.size)
    if not (scale > 0 and df is not None and df > 0):
        return float("nan")
    critical = stats.t.ppf(0.5 + confidence / 2, df)

    def shortfall(delta: float) -> float:
        nc = delta / scale
        lower = np.nan_to_num(stats.nct.cdf(-critical, df, nc))  # negligible, and NaN far out in scipy
        return stats.nct.sf(critical, df, nc) + lower - power

    high = critical * scale
    while shortfall(high) < 0:  # widen until the power is reached
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high))


def no_interval_reason(differences) -> str:
    """What the verdict column says where the differences (seeds, or seeds x items) gave no interval."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return "too few seeds"
    if not np.isfinite(d).all():
        return "non-finite values"
    return "no spread to test"


def verdict(low: float, high: float, higher_is_better: bool, none: str = "too few seeds") -> str:
    """`none`: what to say where there is no interval (`no_interval_reason`)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return none
    better_side = low > 0 if higher_is_better else high < 0
    worse_side = high < 0 if higher_is_better else low > 0
    if better_side:
        return "DSD better than control"
    if worse_side:
        return "DSD worse than control"
    return "no significant difference"


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def sweep_rows(row, seeds, output_dir: str) -> list[dict]:
    """Per swept sparsity: validation and test metric of the final phase over seeds."""
    rows = []
    for sparsity, recipe in sorted(row.variants.items()):
        runs = [read_eval(output_dir, row.name, s, recipe.final) for s in seeds]
        metric = runs[0]["metric"]
        val, test = [r["val"][metric] for r in runs], [r["test"][metric] for r in runs]
        rows.append(
            {
                "row": row.name,
                "sparsity": sparsity,
                "final_phase": recipe.final,
                "metric": metric,
                "higher_is_better": runs[0]["higher_is_better"],
                "val_mean": float(np.mean(val)),
                "val_std": _std(val),
                "test_mean": float(np.mean(test)),
                "test_std": _std(test),
            }
        )
    return rows


def chosen_final_phase(row, seeds, output_dir: str) -> tuple[str, float | None]:
    """The phase that stands for DSD: the recipe's final phase, or the sweep's best on the validation set."""
    if not row.sweep:
        return row.recipe.final, None
    rows = sweep_rows(row, seeds, output_dir)
    pick = max if rows[0]["higher_is_better"] else min
    best = pick(rows, key=lambda r: r["val_mean"])
    return best["final_phase"], best["sparsity"]


# Converged: the least-squares trend of the seeds' mean validation curve over the dense phase's last 4 epochs is
# flatter than 0.5 metric points (error, WER or BLEU points) per epoch: the row's recipe has stopped improving. A
# trend of the mean, not of each seed: a 500-image validation error scatters around its trend by 0.3-1.5 points from
# epoch to epoch (measured on the embedded rows), which puts up to ~0.7 points per epoch of chance into one seed's
# 4-epoch trend and 1/sqrt(seeds) of that into the mean's. The seeds whose own trend is that flat are counted beside.
CONVERGED_WINDOW, CONVERGED_POINTS_PER_EPOCH = 4, 0.5
# A flat curve is no sign of convergence when it is flat at chance (a model that never learned): a dense model
# whose seeds' mean final validation value is not this many points better than a guess is "at chance". Far above
# the epoch-to-epoch scatter, far below what any trained row gains over chance.
CLEAR_OF_CHANCE_POINTS = 5.0


def _trend(values) -> float:
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


def dense_convergence(output_dir: str, row: str, seeds) -> tuple[float, str, str]:
    """(trend of the seeds' mean validation curve over the dense phase's last epochs, in metric points per epoch;
    whether that meets the criterion; how many seeds' own trends do, "k/S"). A pretrained start (no dense
    epochs) is converged by its own training."""
    records = [read_metrics(output_dir, row, seed, "dense") for seed in seeds]
    curves = [[h["val"][r["metric"]] for h in r["history"]] for r in records]
    if not all(curves):
        return float("nan"), "pretrained", ""
    # a model at chance is said so however short its dense phase: "too few epochs" hid that it never learned
    final = float(np.mean([c[-1] for c in curves]))
    if min(map(len, curves)) < CONVERGED_WINDOW:
        return float("nan"), "at chance" if _at_chance(records[0], final) else "too few epochs", ""
    last = np.array([c[-CONVERGED_WINDOW:] for c in curves], dtype=float)
    trend = _trend(last.mean(axis=0))
    flat = f"{sum(abs(_trend(c)) < CONVERGED_POINTS_PER_EPOCH for c in last)}/{len(curves)}"
    if _at_chance(records[0], final):
        return trend, "at chance", flat
    return trend, "yes" if abs(trend) < CONVERGED_POINTS_PER_EPOCH else "no", flat


def _at_chance(record: dict, final: float) -> bool:
    """Whether the dense model's final validation value is within CLEAR_OF_CHANCE_POINTS of its track's chance
    level (rows whose metric has one: not BLEU)."""
    track = tracks.get(record["track"]).config
    chance = track.chance_level(record["spec"]["model"]) if record["metric"] == track.METRIC else None
    if chance is None:
        return False
    better = final - chance if record["higher_is_better"] else chance - final
    return better < CLEAR_OF_CHANCE_POINTS


def comparison_row(output_dir: str, row: str, seeds, final_phase: str, rows_in_table: int = 1) -> dict:
    runs = {
        seed: {name: read_eval(output_dir, row, seed, name) for name in ("dense", final_phase, CONTROL)}
        for seed in seeds
    }
    first = runs[seeds[0]]["dense"] | {"dataset": read_metrics(output_dir, row, seeds[0], "dense")["dataset"]}
    metric, higher = first["metric"], first["higher_is_better"]
    base = [runs[s]["dense"]["test"][metric] for s in seeds]
    dsd = [runs[s][final_phase]["test"][metric] for s in seeds]
    control = [runs[s][CONTROL]["test"][metric] for s in seeds]
    per_item = item_differences([runs[s][final_phase] for s in seeds], [runs[s][CONTROL] for s in seeds])
    joint = joint_confidence(rows_in_table)
    none = no_interval_reason(per_item if per_item is not None else np.subtract(dsd, control))
    if per_item is not None:
        diff_mean, low, high, scale, df = paired_ci_items(per_item)
        _, joint_low, joint_high, _, _ = paired_ci_items(per_item, joint)
        detectable = detectable_difference(scale=scale, df=df, confidence=joint)
    else:
        diff_mean, low, high = paired_ci(np.subtract(dsd, control))
        _, joint_low, joint_high = paired_ci(np.subtract(dsd, control), joint)
        detectable = detectable_difference(np.subtract(dsd, control), confidence=joint)
    headline = paper_headline()
    paper = headline.loc[row] if row in headline.index else None
    out = {
        "row": row,
        "dataset": first["dataset"],
        "metric": metric,
        "higher_is_better": higher,
        "paper_dataset": paper["dataset"] if paper is not None else "",
        "paper_metric": paper["metric"] if paper is not None else "",
        "paper_baseline": float(paper["paper_baseline"]) if paper is not None else float("nan"),
        "paper_dsd": float(paper["paper_dsd"]) if paper is not None else float("nan"),
        "paper_rel_gain_pct": float(paper["paper_rel_gain_pct"]) if paper is not None else float("nan"),
        "baseline_mean": float(np.mean(base)),
        "baseline_std": _std(base),
        "dsd_mean": float(np.mean(dsd)),
        "dsd_std": _std(dsd),
        "control_mean": float(np.mean(control)),
        "control_std": _std(control),
        "rel_gain_vs_baseline_pct": rel_gain_pct(float(np.mean(base)), float(np.mean(dsd)), higher),
        "rel_gain_vs_control_pct": rel_gain_pct(float(np.mean(control)), float(np.mean(dsd)), higher),
        "dsd_minus_control_mean": diff_mean,
        "dsd_minus_control_ci95_low": low,
        "dsd_minus_control_ci95_high": high,
        "ci_excludes_zero": bool(math.isfinite(low) and (low > 0 or high < 0)),
        "verdict_row_alone": verdict(low, high, higher, none),
        "joint_confidence": joint,
        "dsd_minus_control_joint_low": joint_low,
        "dsd_minus_control_joint_high": joint_high,
        "verdict": verdict(joint_low, joint_high, higher, none),
        "detectable_difference": detectable,
        "interval_over": "seeds" if per_item is None else "seeds and test items",
        "n_seeds": len(seeds),
    }
    out["dense_trend_per_epoch"], out["dense_converged"], out["dense_flat_seeds"] = dense_convergence(
        output_dir, row, seeds
    )
    # the paper's second metric, and for beam-decoded speech the greedy (acoustic model alone) rates
    extra_metrics = {
        "top1_error_pct": ["top5_error_pct"],
        "bleu4": ["bleu1"],
        "wer_pct": ["cer_pct", "greedy_wer_pct", "greedy_cer_pct"],
    }.get(metric, [])
    for second in (name for name in extra_metrics if name in first["test"]):
        out[f"baseline_{second}_mean"] = float(np.mean([runs[s]["dense"]["test"][second] for s in seeds]))
        out[f"dsd_{second}_mean"] = float(np.mean([runs[s][final_phase]["test"][second] for s in seeds]))
        out[f"control_{second}_mean"] = float(np.mean([runs[s][CONTROL]["test"][second] for s in seeds]))
    return out


def phase_rows(output_dir: str, row: str, seeds, phase_names: list[str]) -> list[dict]:
    """One line per seed and phase; `phase_names`: the row's, with the control and each sweep variant's phases."""
    rows = []
    for seed in seeds:
        for name in phase_names:
            m = read_metrics(output_dir, row, seed, name)
            e = read_eval(output_dir, row, seed, name)
            rows.append(
                {
                    "row": row,
                    "seed": seed,
                    "phase": name,
                    "kind": m["kind"],
                    "metric": m["metric"],
                    "test_value": e["test"][m["metric"]],
                    "val_value": e["val"][m["metric"]],
                    "target_sparsity": m["target_sparsity"],
                    "measured_sparsity": m["measured_sparsity"],
                    "epochs": m["epochs"],
                    "lr": m["lr"],
                    "wall_seconds": m["wall_seconds"],
                }
            )
    return rows


MISSING = "n/a"  # a value the runs do not give (a spread of one seed, a paper figure of a row of our own)


def _markdown(frame: pd.DataFrame, as_written: tuple[str, ...] = ()) -> str:
    """Numbers to 2 decimals, but the columns `as_written` (text already formatted: tabulate would read "0.001"
    as a number and print it as 0.00); a missing value as MISSING, not as the number "nan"."""
    keep = [list(frame.columns).index(column) for column in as_written]
    cells = frame.astype(object).where(frame.notna(), None)  # tabulate's missing value is None, not NaN
    return cells.to_markdown(index=False, floatfmt=".2f", disable_numparse=keep, missingval=MISSING) + "\n"


def samples_table(output_dir: str, row: str, seed: int, dsd_phase: str) -> pd.DataFrame | None:
    """Reference vs dense vs DSD outputs on the first test items (captions, transcripts); `dsd_phase` is the
    comparison's (a sweep's validation-chosen variant), so the samples show the model the table reports."""
    dense, dsd = (read_eval(output_dir, row, seed, name).get("samples") for name in ("dense", dsd_phase))
    if not dense or not dsd:
        return None
    return pd.DataFrame(
        {
            "item": [s.get("id") or Path(s.get("image", "")).name for s in dense],
            "reference": [s["reference"] for s in dense],
            "dense": [s["hypothesis"] for s in dense],
            "dsd": [s["hypothesis"] for s in dsd],
        }
    )


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a cgroup's cpuset), not the machine's.
    Snakemake's --cores is not recorded, so the table job's own allowance stands in for the pipeline's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def runtime_rows(
    output_dir: str, rows, seeds, cores: int | None = None, phases: dict | None = None
) -> list[dict]:
    """What each row cost, from Snakemake's per-job benchmark files: jobs, their summed wall time, and that
    sum divided by the cores running jobs side by side (a row's share of the pipeline's wall time). With
    `phases` (row -> its phase names), only those phases' training and evaluation jobs: a phase an earlier
    config had (a sparsity dropped from a sweep) left its files, which are no cost of this config's runs."""
    cores = cores or available_cores()
    out = []
    for row in rows:
        files = [
            f
            for seed in seeds
            for f in (paths.benchmarks_dir(output_dir) / "rules" / row / f"seed{seed}").glob("*.tsv")
            if phases is None or f.name.removesuffix(".tsv").removesuffix(".eval") in phases[row]
        ]
        if not files:
            continue
        seconds = sum(float(pd.read_csv(f, sep="\t")["s"].iloc[0]) for f in files)
        out.append(
            {"row": row, "jobs": len(files), "job_minutes": seconds / 60, "cores": cores,
             "share_of_run_minutes": seconds / 60 / cores}
        )  # fmt: skip
    return out


ROW_TABLES = ("sweep_*.csv", "samples_*.md", "samples_*.csv")  # one per row that has one


def comparable(specs) -> None:
    """A row of one phase (a dense run, kept for another row's use) has neither DSD nor an equal-epoch control:
    the table names it, where its missing control run would fail as a file that no run ever writes."""
    for row in specs:
        if len(row.recipe.phases) < 2:
            raise ConfigError(
                f"row {row.name}: one phase ({row.recipe.final}), so no DSD phase and no equal-epoch control to "
                "tabulate (a row only trained for another's use belongs under experiments, not in rows)"
            )


def write_tables(specs, seeds, output_dir: str, out_dir: str | Path) -> pd.DataFrame:
    """paper_comparison.{csv,md}, phases.{csv,md}, runtime.{csv,md}, sweep_<row>.csv and samples_<row>.md."""
    comparable(specs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths.remove_row_files(out_dir, ROW_TABLES)
    seeds = list(seeds)
    recipes = {row.name: row.recipe for row in specs}
    rows = []
    for row in specs:
        final, chosen = chosen_final_phase(row, seeds, output_dir)
        rows.append(
            comparison_row(output_dir, row.name, seeds, final, rows_in_table=len(specs))
            | {"dsd_phase": final, "chosen_sparsity": chosen}
        )
        if row.sweep:
            pd.DataFrame(sweep_rows(row, seeds, output_dir)).to_csv(
                out_dir / f"sweep_{row.name}.csv", index=False
            )
    comparison = pd.DataFrame(rows)
    phases = pd.DataFrame(
        [p for row in specs for p in phase_rows(output_dir, row.name, seeds, row.phase_names)]
    )
    comparison.to_csv(out_dir / "paper_comparison.csv", index=False)
    phases.to_csv(out_dir / "phases.csv", index=False)
    shown = [
        "row",
        "metric",
        "paper_baseline",
        "paper_dsd",
        "paper_rel_gain_pct",
        "baseline_mean",
        "baseline_std",
        "dsd_mean",
        "dsd_std",
        "control_mean",
        "control_std",
        "rel_gain_vs_baseline_pct",
        "rel_gain_vs_control_pct",
        "dsd_minus_control_joint_low",
        "dsd_minus_control_joint_high",
        "verdict",
        "detectable_difference",
        "n_seeds",
        "interval_over",
        "dense_converged",
        "dense_flat_seeds",
    ]
    (out_dir / "paper_comparison.md").write_text(_markdown(comparison[shown]))
    shown_phases = phases.assign(lr=[f"{lr:.3g}" for lr in phases["lr"]])  # most LRs round to 0.00 otherwise
    (out_dir / "phases.md").write_text(_markdown(shown_phases, as_written=("lr",)))
    runtime = pd.DataFrame(
        runtime_rows(output_dir, list(recipes), seeds, phases={row.name: row.phase_names for row in specs}),
        columns=["row", "jobs", "job_minutes", "cores", "share_of_run_minutes"],
    )  # empty when the runs left no Snakemake benchmark files
    runtime.to_csv(out_dir / "runtime.csv", index=False)
    (out_dir / "runtime.md").write_text(_markdown(runtime))
    from dsd.report import claims, fidelity

    claims.write(comparison, out_dir)
    fidelity_table = fidelity.table(specs)
    (out_dir / "report.rst").write_text(
        landing_page(comparison, fidelity_table, claims.paragraph(comparison))
    )
    fidelity_table.to_csv(out_dir / "fidelity.csv", index=False)
    (out_dir / "fidelity.md").write_text(fidelity.markdown(fidelity_table))
    for row, dsd_phase in zip(comparison["row"], comparison["dsd_phase"], strict=True):
        examples = samples_table(output_dir, row, seeds[0], dsd_phase)
        if examples is not None:
            (out_dir / f"samples_{row}.md").write_text(_markdown(examples))
            examples.to_csv(out_dir / f"samples_{row}.csv", index=False)
    return comparison


def _csv_table(title: str, frame: pd.DataFrame) -> str:
    """An rst csv-table with the frame inline (numbers to 2 decimals)."""

    def cell(value) -> str:
        if isinstance(value, float) and math.isnan(value):
            return f'"{MISSING}"'
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        return '"' + text.replace('"', "'") + '"'

    lines = [f".. csv-table:: {title}", "   :header: " + ", ".join(cell(c) for c in frame.columns), ""]
    lines += ["   " + ", ".join(cell(v) for v in row) for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def interval_method(comparison: pd.DataFrame) -> str:
    """How the verdicts' intervals were computed, in words: over seeds and test items (`paired_ci_items`) where
    evaluations kept per-item outcomes, else a paired t over seeds (`paired_ci`)."""
    items = (
        "intervals of DSD - control over seeds and test items (the variance of the seed means plus that of the "
        "test-item means, t with Welch-Satterthwaite degrees of freedom)"
    )
    seeds = "paired t-intervals of the per-seed difference DSD - control"
    over = comparison.get("interval_over", pd.Series("seeds", index=comparison.index))
    with_items = list(comparison.loc[over == "seeds and test items", "row"])
    if len(with_items) == len(comparison):
        return items
    if not with_items:
        return seeds
    return f"{items} on {', '.join(with_items)}, {seeds} on the other rows"


def landing_page(comparison: pd.DataFrame, fidelity_table: pd.DataFrame, claims_text: str) -> str:
    """The Snakemake report's first page: the answer (the table and what it says), then how to read the rest."""
    shown = comparison[["row", "metric", "baseline_mean", "dsd_mean", "dsd_std", "control_mean", "control_std",
                        "rel_gain_vs_baseline_pct", "rel_gain_vs_control_pct", "verdict", "n_seeds",
                        "dense_converged"]]  # fmt: skip
    parts = [
        "DSD: Dense-Sparse-Dense training, results",
        "=========================================",
        "",
        claims_text,
        "",
        _csv_table(
            "Ours (mean and standard deviation over seeds) and the verdict against the equal-epoch control",
            shown,
        ),
        "How to read this report: **Tables** has the full comparison (with the paper's figures) and every phase of "
        "every run; **Plots** the gains (ours and the paper's, on separate axes), the learning curves (mean over "
        "seeds with a min-max band; the stretch after the dense phase enlarged) and, per row, a sparsity sweep "
        "where there is one; **Weights** the weight distribution of one layer through dense, pruning, sparse and "
        "re-dense training; **Samples** captions and transcripts of the dense and the DSD model. Positive gains are "
        "better; the verdict uses "
        f"{interval_method(comparison)}, holding at 95% for all rows together (Bonferroni).",
        "",
    ]
    if not fidelity_table.empty:
        deviations = fidelity_table[~fidelity_table["verdict"].eq("same")]
        parts += [
            _csv_table("Where this configuration departs from the paper (dsd fidelity)", deviations),
            "",
        ]
    return "\n".join(parts)
