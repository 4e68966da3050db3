"""The sentences about results, generated from the comparison table, so prose and numbers cannot drift apart.

`make publish` writes them into the README between the markers `<!-- results:begin -->` and
`<!-- results:end -->` (and the table itself between `<!-- table:begin -->` and `<!-- table:end -->`); the
table command writes the same text to `results/tables/claims.md`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from dsd.report.tables import CLEAR_OF_CHANCE_POINTS, CONVERGED_POINTS_PER_EPOCH, CONVERGED_WINDOW
from dsd.words import counted


def _rows(frame: pd.DataFrame, mask) -> list[str]:
    return list(frame.loc[mask, "row"])


def _names(rows: list[str]) -> str:
    if not rows:
        return "none"
    return rows[0] if len(rows) == 1 else ", ".join(rows[:-1]) + " and " + rows[-1]


def _over_items(comparison: pd.DataFrame) -> str:
    """Which rows' intervals also count the test set's draw (evaluations that kept per-item outcomes)."""
    if "interval_over" not in comparison:
        return ""
    with_items = _rows(comparison, comparison["interval_over"] == "seeds and test items")
    if not with_items:
        return ""
    which = "" if len(with_items) == len(comparison) else f" on {_names(with_items)}"
    return f" (and over the test items{which}, whose draw all seeds share)"


def _too_short(comparison: pd.DataFrame) -> str:
    """The rows whose dense phase is shorter than the criterion's window: not judged, rather than failed."""
    short = _rows(comparison, comparison["dense_converged"] == "too few epochs")
    if not short:
        return ""
    return f"; not judged on {len(short)} ({_names(short)}: fewer than {CONVERGED_WINDOW} dense epochs)"


def _flat_seeds(comparison: pd.DataFrame) -> str:
    """How many single seeds' own trends met the threshold (their validation curves carry more chance)."""
    counts = [c.split("/") for c in comparison.get("dense_flat_seeds", pd.Series(dtype=str)).dropna() if c]
    if not counts:
        return ""
    flat, total = (sum(int(c[i]) for c in counts) for i in (0, 1))
    return f"; single seeds' trends, with more chance in them, met it in {flat} of {total} dense runs"


def _joint(comparison: pd.DataFrame) -> str:
    """How the verdicts' intervals hold: 'at 95% for the 7 rows together (99.3% each, Bonferroni)'."""
    levels = comparison.get("joint_confidence")
    if levels is None or levels.isna().all() or len(comparison) == 1:
        return "at 95%"
    return f"at 95% for the {len(comparison)} rows together ({100 * levels.iloc[0]:.1f}% each, Bonferroni)"


def _bound(value: float) -> str:
    """An interval's end to 2 decimals, or to 2 significant digits where 2 decimals would print 0.00: a verdict
    rests on the end's side of zero, which "0.00 to 0.47" beside "DSD worse" would hide (0.0013 excludes zero)."""
    return f"{value:.2g}" if value != 0 and round(value, 2) == 0 else f"{value:.2f}"


def _rows_alone(comparison: pd.DataFrame) -> str:
    """Where a row's own 95% interval, uncorrected for the table's other rows, would give another verdict."""
    if "verdict_row_alone" not in comparison or len(comparison) == 1:
        return ""
    if not comparison["verdict"].isin(INTERVAL_VERDICTS).any():  # no interval anywhere: nothing to agree on
        return ""
    differ = comparison[comparison["verdict_row_alone"] != comparison["verdict"]]
    if differ.empty:
        return " Each row's own 95% interval gives the same verdicts."
    cases = "; ".join(
        f"{r.row}: {r.verdict_row_alone}, {_bound(r.dsd_minus_control_ci95_low)} to "
        f"{_bound(r.dsd_minus_control_ci95_high)}"
        for r in differ.itertuples()
    )
    return f" Each row's own 95% interval, read alone, would say otherwise on {len(differ)} ({cases})."


INTERVAL_VERDICTS = ("DSD better than control", "DSD worse than control", "no significant difference")


def _baseline_sentence(comparison: pd.DataFrame) -> str:
    """DSD against its own dense baseline, counted over the rows that have a gain (a NaN gain is named apart).
    The tables have no interval of DSD - baseline, so these are point estimates and the sentence says so."""
    gain = comparison["rel_gain_vs_baseline_pct"]
    valued = np.isfinite(gain.astype(float))
    better, not_better = _rows(comparison, valued & (gain > 0)), _rows(comparison, valued & (gain <= 0))
    missing = _rows(comparison, ~valued)
    asides = ([f"not on {_names(not_better)}"] if not_better else []) + (
        [f"no value on {_names(missing)}"] if missing else []
    )
    rows = f"{counted(int(valued.sum()), 'row')} with a value" if missing else counted(len(comparison), "row")
    return (
        f"On the means over seeds (point estimates, not tested), DSD is better than its own dense baseline on "
        f"{len(better)} of the {rows}" + (f" ({'; '.join(asides)})" if asides else "") + "."
    )


def _no_interval(comparison: pd.DataFrame) -> str:
    """', and has no interval on 1 (deepspeech2: too few seeds)': rows whose verdict is none of the three."""
    without = comparison[~comparison["verdict"].isin(INTERVAL_VERDICTS)]
    if without.empty:
        return ""
    cases = "; ".join(f"{r.row}: {r.verdict}" for r in without.itertuples())
    return f", and has no interval on {len(without)} ({cases})"


def paragraph(comparison: pd.DataFrame) -> str:
    """What the table says: DSD against its dense baseline and against the equal-epoch control, per row."""
    n = len(comparison)
    gain = comparison["rel_gain_vs_baseline_pct"]
    better_than_base = _rows(comparison, gain > 0)
    verdicts = comparison["verdict"]
    beat = _rows(comparison, verdicts == "DSD better than control")
    worse = _rows(comparison, verdicts == "DSD worse than control")
    tie = _rows(comparison, verdicts == "no significant difference")
    seeds = sorted(set(comparison["n_seeds"]))
    text = [
        _baseline_sentence(comparison),
        f"Against the dense model trained for the same total number of epochs (the equal-epoch control), the paired "
        f"interval of DSD - control over {'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}"
        f"{_over_items(comparison)}, "
        f"{_joint(comparison)}, excludes zero in DSD's favour on "
        f"{counted(len(beat), 'row')}"
        + (f" ({_names(beat)})" if beat else "")
        + f", includes zero on {len(tie)}"
        + (f" ({_names(tie)})" if tie else "")
        + f", {'' if _no_interval(comparison) else 'and '}favours the control on {len(worse)}"
        + (f" ({_names(worse)})" if worse else "")
        + _no_interval(comparison)
        + "."
        + _rows_alone(comparison),
    ]
    # only where every row was tested and none decided: "too few seeds" tests nothing, and a control that beats
    # DSD says more than "not distinguishable"
    if len(tie) == n and better_than_base:
        where = "" if len(better_than_base) == n else f" (on {_names(better_than_base)}, where it has one)"
        text.append(
            f"So at this scale DSD's gain over its baseline{where} is not distinguishable from the extra epochs at "
            "this power: on every row the interval of DSD - control includes zero."
        )
    detectable = comparison.get("detectable_difference")
    relative = None
    if detectable is not None:  # a share of a control of 0 (BLEU of a model that never learned) is no size
        relative = 100.0 * detectable / comparison["control_mean"].abs()
        relative = relative.where(np.isfinite(relative.astype(float)))
    if relative is not None and relative.notna().any():
        low, high = f"{relative.min():.0f}%", f"{relative.max():.0f}%"
        size = f"at {low}" if low == high else f"from {low} to {high}"
        rows = ", depending on the row" if low != high else ""
        sentence = (
            f"With these seeds and test sets, a true DSD - control difference is detected 80% of the time (by that "
            f"joint test) {size} of the control's value{rows} (column `detectable_difference`)"
        )
        paper = comparison.get("paper_rel_gain_pct")
        if paper is not None and paper.notna().any():
            larger = _rows(comparison, relative > paper.abs())
            both = int((relative.notna() & paper.notna()).sum())  # a row without either is no comparison
            sentence += (
                f"; on {len(larger)} of the {counted(both, 'row')} that is more than the paper's own relative "
                "gain for the row, so an effect of the paper's size could pass unseen there"
            )
        text.append(sentence + ".")
    if "dense_converged" in comparison:
        converged = _rows(comparison, comparison["dense_converged"].isin(["yes", "pretrained"]))
        text.append(
            f"The dense baseline met the convergence criterion (the least-squares trend of the seeds' mean "
            f"validation curve over the dense phase's last {CONVERGED_WINDOW} epochs is flatter than "
            f"{CONVERGED_POINTS_PER_EPOCH:g} points per epoch) on {len(converged)} of the {counted(n, 'row')}"
            + (f" ({_names(converged)})" if converged and len(converged) < n else "")
            + _too_short(comparison)
            + _flat_seeds(comparison)
            + "."
        )
        stuck = _rows(comparison, comparison["dense_converged"] == "at chance")
        if stuck:
            text.append(
                f"The dense baseline of {_names(stuck)} ended within {CLEAR_OF_CHANCE_POINTS:g} points of chance "
                "(a model that guesses): it did not learn, so DSD's verdict there says nothing about DSD."
            )
    greedy = [c for c in ("baseline_greedy_wer_pct_mean",) if c in comparison]
    speech = comparison[comparison["metric"] == "wer_pct"]
    if greedy and not speech.empty and speech[greedy[0]].notna().any():
        low, high = speech[greedy[0]].min(), speech[greedy[0]].max()
        text.append(
            f"Speech WER is from the configured decoder; decoded greedily, the same dense models' WER is "
            f"{low:.0f}-{high:.0f}% (columns `*_greedy_*` of the CSV)."
        )
    return " ".join(text)


STABILITY_COLUMNS = [
    "verdict",
    "dsd_minus_control_mean",
    "dsd_minus_control_joint_low",
    "dsd_minus_control_joint_high",
    "verdict_row_alone",
    "dsd_minus_control_ci95_low",
    "dsd_minus_control_ci95_high",
]


IN_RUNS = {"both": "both", "left_only": "first only", "right_only": "second only"}


def stability(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Per row, the verdicts of two runs that differ only in a setting that must not change results, with each
    run's DSD - control difference, intervals and seed count where the tables have them. A row of only one run
    is kept (column `in_runs`), so that the sentence can name it rather than lose it."""
    columns = ["row"] + [c for c in [*STABILITY_COLUMNS, "n_seeds"] if c in first and c in second]
    both = first[columns].merge(
        second[columns], on="row", how="outer", suffixes=("_first", "_second"), indicator=True
    )
    # an outer merge sorts the rows: back to the tables' order, the first run's rows first
    order = {row: k for k, row in enumerate(dict.fromkeys([*first["row"], *second["row"]]))}
    both = both.sort_values("row", key=lambda rows: rows.map(order)).reset_index(drop=True)
    both = both.assign(in_runs=both.pop("_merge").astype(str).map(IN_RUNS))
    both = both.assign(same=both["verdict_first"] == both["verdict_second"])
    if "verdict_row_alone_first" in both:
        both = both.assign(same_row_alone=both["verdict_row_alone_first"] == both["verdict_row_alone_second"])
    return both


def _difference(row, run: str, interval: str = "joint") -> str:
    """' (DSD - control +0.29, 0.04 to 0.53)' where the stability table has the run's numbers; tables written
    before joint intervals have only each row's own (ci95)."""
    mean = getattr(row, f"dsd_minus_control_mean_{run}", None)
    if getattr(row, f"dsd_minus_control_{interval}_low_{run}", None) is None:
        interval = "ci95"
    low, high = (getattr(row, f"dsd_minus_control_{interval}_{end}_{run}", None) for end in ("low", "high"))
    if mean is None or low is None or high is None:
        return ""
    if not (np.isfinite(low) and np.isfinite(high)):  # one seed, or no spread: the verdict says which
        return f" (DSD - control {mean:+.2f}, no interval)"
    return f" (DSD - control {mean:+.2f}, {_bound(low)} to {_bound(high)})"


def _flips(frame: pd.DataFrame, verdict: str, interval: str) -> str:
    return "; ".join(
        f"{r.row}: {getattr(r, verdict + '_first')}{_difference(r, 'first', interval)} -> "
        f"{getattr(r, verdict + '_second')}{_difference(r, 'second', interval)}"
        for r in frame.itertuples()
    )


def _missing(frame: pd.DataFrame) -> str:
    """'; resnet18 is only in the first run': rows that one of the two tables lacks."""
    if "in_runs" not in frame:
        return ""
    parts = []
    for run in ("first", "second"):
        rows = _rows(frame, frame["in_runs"] == f"{run} only")
        if rows:
            parts.append(f"{_names(rows)} {'is' if len(rows) == 1 else 'are'} only in the {run} run")
    return "".join(f"; {part}" for part in parts)


def _seed_counts(frame: pd.DataFrame) -> str:
    """'; the first run has 3 seeds per row, the second 10' where the runs' seed counts differ."""
    if "n_seeds_first" not in frame:
        return ""
    firsts, seconds = (
        sorted(set(frame[f"n_seeds_{run}"].dropna().astype(int))) for run in ("first", "second")
    )
    if firsts == seconds and len(firsts) <= 1:
        return ""
    return (
        f"; the first run has {'/'.join(map(str, firsts))} seed{'s' if firsts != [1] else ''} per row, the second "
        f"{'/'.join(map(str, seconds))}"
    )


def stability_sentence(frame: pd.DataFrame, setting: str) -> str:
    if "in_runs" in frame:
        frame, whole = frame[frame["in_runs"] == "both"], frame
    else:
        whole = frame
    changed = frame[~frame["same"]]
    text = (
        f"A second fresh run that differs only in {setting}, a setting that must not change a result, gives the "
        f"same verdict on {int(frame['same'].sum())} of the {counted(len(frame), 'row')}"
        + (" in both runs" if len(whole) > len(frame) else "")
        + _missing(whole)
        + _seed_counts(whole)
    )
    tested = changed["verdict_first"].isin(INTERVAL_VERDICTS) & changed["verdict_second"].isin(
        INTERVAL_VERDICTS
    )
    # what moved them is known only as `setting` (a thread count, a GPU model, ...): no cause is guessed
    if tested.any():
        text += (
            f" ({_flips(changed, 'verdict', 'joint')}): the per-seed values move with that setting, and "
            "with these seeds the verdicts of those rows do not hold across such runs; read them as undecided"
        )
    elif not changed.empty:  # a run with no interval on the row (too few seeds): not a verdict that moved
        text += f" ({_flips(changed, 'verdict', 'joint')})"
    if not tested.all():
        untested = _rows(changed, ~tested)
        text += f"; {_names(untested)} had no interval in one of the runs, so no verdict to hold"
    if "same_row_alone" in frame and not frame["same_row_alone"].all():
        alone = frame[~frame["same_row_alone"]]
        text += (
            f". Judged by each row's own 95% interval, without the correction for the table's {counted(len(frame), 'row')}, "
            f"the two runs would differ on {len(alone)} ({_flips(alone, 'verdict_row_alone', 'ci95')})"
        )
    return text + "."


def write(comparison: pd.DataFrame, out: Path) -> Path:
    path = Path(out) / "claims.md"
    path.write_text(paragraph(comparison) + "\n")
    return path


def fill_readme(readme: Path, marker: str, text: str) -> None:
    """Replace what stands between `<!-- marker:begin -->` and `<!-- marker:end -->` with `text`."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    content = readme.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{readme}: no {begin} ... {end} markers")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", content))
