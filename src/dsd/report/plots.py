"""Figures from finished runs (matplotlib, PNG for the README and PDF for papers).

- gains.png: relative gain of DSD over its baseline and over the equal-epoch control (the table's), ours vs the
  paper's.
- curves.png: validation metric and training loss per epoch across the phases, control overlaid.
- weights_<row>.png: one layer's weight histogram after dense, after pruning, after sparse training, after
  re-dense (the paper's distribution figure).
- captions.png: test images with the reference and the dense and DSD captions (captioning rows).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from dsd import paths, tracks  # noqa: E402
from dsd.core.masks import unpack_mask  # noqa: E402
from dsd.core.schedule import CONTROL, Recipe  # noqa: E402
from dsd.errors import DSDError  # noqa: E402
from dsd.report.tables import chosen_final_phase, read_eval, read_metrics, rel_gain_pct, sweep_rows  # noqa: E402
from dsd.words import counted  # noqa: E402


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(files[0], dpi=130, bbox_inches="tight")
    fig.savefig(files[1], bbox_inches="tight")
    plt.close(fig)
    return files


GAINS = {
    "DSD vs its dense baseline": "rel_gain_vs_baseline_pct",
    "DSD vs the equal-epoch control": "rel_gain_vs_control_pct",
}


def seed_gains(comparison: pd.DataFrame, output_dir: str, seeds) -> dict[str, list[list[float]]]:
    """Each seed's own relative gains, per row, under the labels of GAINS: the dots beside the table's bars."""
    dsd_phase = dict(zip(comparison["row"], comparison["dsd_phase"], strict=True))  # sweeps: the chosen one
    out = {label: [] for label in GAINS}
    for row in comparison["row"]:
        base, ctrl = [], []
        for seed in seeds:
            dense, final = (
                read_eval(output_dir, row, seed, "dense"),
                read_eval(output_dir, row, seed, dsd_phase[row]),
            )
            control = read_eval(output_dir, row, seed, CONTROL)
            metric, higher = dense["metric"], dense["higher_is_better"]
            base.append(rel_gain_pct(dense["test"][metric], final["test"][metric], higher))
            ctrl.append(rel_gain_pct(control["test"][metric], final["test"][metric], higher))
        out["DSD vs its dense baseline"].append(base)
        out["DSD vs the equal-epoch control"].append(ctrl)
    return out


def gains(
    comparison: pd.DataFrame, out: Path, per_seed: dict[str, list[list[float]]] | None = None
) -> list[Path]:
    """Our gains beside, not on the axis of, the paper's: different data and scale. The bars are the table's
    (the gain of the means over seeds), so figure and table agree; `per_seed` adds each seed's gain as a dot."""
    rows = list(comparison["row"])
    seeds = "/".join(map(str, sorted(set(comparison["n_seeds"]))))
    y = np.arange(len(rows))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.55 * len(rows) + 1.6), sharey=True,
                                      gridspec_kw={"width_ratios": [2.2, 1]})  # fmt: skip
    for k, ((label, column), color) in enumerate(zip(GAINS.items(), ("#1f77b4", "#d62728"), strict=True)):
        offset = 0.18 * (1 - 2 * k)
        left.barh(
            y + offset, comparison[column], 0.34, color=color, alpha=0.75,
            label=f"{label} (gain of the {seeds}-seed means)",
        )  # fmt: skip
        for yy, v in zip(y + offset, (per_seed or {}).get(label, []), strict=False):
            left.plot(v, [yy] * len(v), "o", color="black", markersize=2.5)
    left.axvline(0, color="black", linewidth=0.8)
    left.set_yticks(y, [f"{r} ({m})" for r, m in zip(rows, comparison["metric"], strict=True)], fontsize=8)
    left.set_xlabel("relative gain, % (positive = better" + ("; dots: seeds)" if per_seed else ")"))
    ours = _our_data(comparison)
    left.set_title(f"ours: {ours}", fontsize=10)
    legend = left.legend(
        fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2
    )  # never on a bar
    right.barh(y, comparison["paper_rel_gain_pct"], 0.5, color="#999999")
    for yy in y[comparison["paper_rel_gain_pct"].isna().to_numpy()]:  # a row of our own: no bar is no zero
        right.text(
            0.02, yy, "not in the paper", transform=right.get_yaxis_transform(), va="center", fontsize=7
        )
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel("relative gain, % (DSD vs baseline)")
    right.set_title("the paper (ImageNet, Flickr8k, WSJ)", fontsize=10)
    scales = (
        "two scales, two axes, not comparable in size" if ours == MINIATURES else "ours beside the paper's"
    )
    fig.suptitle(f"DSD's gains: {scales}", fontsize=10)
    fig.tight_layout()
    _below_the_label(fig, left, legend)
    return _save(fig, out, "gains")


MINIATURES = "embedded miniatures"


def _our_data(comparison: pd.DataFrame) -> str:
    """What our bars were measured on: the embedded miniatures (generated data sets), or the data sets' names
    (the paper configuration: ImageNet, not a miniature)."""
    generated = {name for track in tracks.NAMES for name, kind in tracks.get(track).config.DATASETS.items()
                 if kind == "generated"}  # fmt: skip
    datasets = list(dict.fromkeys(comparison["dataset"]))
    if set(datasets) <= generated:
        return MINIATURES
    return ", ".join(datasets)


def _below_the_label(fig, ax, legend) -> None:
    """Move the legend under the axis label where it would cover it: its place is a share of the axes' height,
    which a table of one or two rows makes too short for the label. Moved, it keeps its distance in points,
    which the axes' height after the new layout does not change."""
    fig.canvas.draw()  # lays the axis label out where it will be drawn
    label = ax.xaxis.label.get_window_extent(fig.canvas.get_renderer())
    to_points = 72 / fig.dpi
    depth = (ax.bbox.y0 - label.y0) * to_points + 3  # 3 points between the label and the legend
    place = -legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).y0 * ax.bbox.height * to_points
    if depth > place:
        legend.set_bbox_to_anchor(
            (0.5, 0), transform=offset_copy(ax.transAxes, fig, y=-depth, units="points")
        )
        fig.tight_layout()


def _segments(recipe: Recipe, phase: str) -> list[float]:
    """The epochs of each phase a job trained (the control: every phase after the dense one)."""
    if phase == CONTROL:
        return [p.epochs for p in recipe.phases[1:]]
    return [recipe[phase].epochs]


def _chain_history(output_dir: str, row: str, seed: int, recipe: Recipe, names: list[str]):
    """(x in epochs, records) over a chain of phases at their true epochs: record k of a phase of E epochs
    is at min(k, E) into it (a 0.75-epoch phase's one record at .75)."""
    xs, records, start = [], [], 0.0
    for phase in names:
        history = iter(read_metrics(output_dir, row, seed, phase)["history"])
        for epochs in _segments(recipe, phase):
            for k in range(1, math.ceil(epochs) + 1):
                records.append(next(history))
                xs.append(start + min(k, epochs))
            start += epochs
    return xs, records


# The curves plot each epoch's validation monitor (tracks/*/metric.py: monitor), not the table's evaluation:
# captions and speech are decoded greedily there, not by the beam search the table's BLEU-4 and WER use.
GREEDY_MONITORS = ("bleu4", "wer_pct")


def monitor_label(metric: str) -> str:
    return f"monitor: {'greedy ' if metric in GREEDY_MONITORS else ''}{metric}"


def curves(
    output_dir: str, seeds, recipes: dict[str, Recipe], out: Path, chosen: dict[str, Recipe]
) -> list[Path]:
    """Per row: validation metric over the whole DSD chain and the control (mean over seeds, band: min-max),
    the stretch after the dense phase enlarged, and the training loss."""
    rows = list(recipes)
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 2.1 * len(rows) + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        names = chosen[row].names
        runs = {seed: _chain_history(output_dir, row, seed, chosen[row], names) for seed in seeds}
        control = {
            seed: _chain_history(output_dir, row, seed, recipes[row], ["dense", CONTROL]) for seed in seeds
        }
        metric = read_metrics(output_dir, row, seeds[0], "dense")["metric"]
        dense_end = read_metrics(output_dir, row, seeds[0], "dense")["epochs"]
        for col, key in enumerate(("val", "val", "train_loss")):
            ax = axes[r][col]
            for arm, color, style in ((runs, "#1f77b4", "-"), (control, "#d62728", "--")):
                xs = arm[seeds[0]][0]
                values = np.array(
                    [
                        [(h["val"][metric] if key == "val" else h["train_loss"]) for h in arm[s][1]]
                        for s in seeds
                    ]
                )
                keep = [i for i, x in enumerate(xs) if col != 1 or x >= dense_end]
                x = np.array(xs)[keep]
                v = values[:, keep]
                label = "DSD (dense > sparse > re-dense ...)" if arm is runs else "equal-epoch dense control"
                ax.plot(
                    x,
                    v.mean(0),
                    style,
                    color=color,
                    linewidth=1.4,
                    label=label if (r, col) == (0, 0) else None,
                )
                ax.fill_between(x, v.min(0), v.max(0), color=color, alpha=0.15, linewidth=0)
            start = 0.0
            for phase in chosen[row].phases:
                if start > 0 and (col != 1 or start > dense_end):
                    ax.axvline(start, color="gray", linewidth=0.6, linestyle=":")
                start += phase.epochs
            ax.tick_params(labelsize=7)
        axes[r][0].set_ylabel(f"{row}\n{monitor_label(metric)}", fontsize=8)
        axes[r][2].set_ylabel("train loss", fontsize=8)
    for col, title in enumerate(
        ("validation (monitor), whole run", "after the dense phase", "training loss")
    ):
        axes[0][col].set_title(title, fontsize=9)
        axes[-1][col].set_xlabel("epoch", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    over = f"mean of {len(seeds)} seeds, band min-max" if len(seeds) > 1 else "one seed, no band"
    labels = [f"{label}: {over}" for label in labels]
    fig.legend(
        handles, labels, loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 1.0), frameon=False
    )
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    return _save(fig, out, "curves")


def representative_layer(masks: dict) -> str:
    """The largest pruned tensor: where the distribution is smoothest."""
    return max(masks, key=lambda n: int(np.prod(masks[n])))


def weight_histograms(output_dir: str, row: str, seed: int, recipe: Recipe, out: Path) -> list[Path]:
    load = lambda phase: torch.load(  # noqa: E731
        paths.checkpoint(paths.run_dir(output_dir, row, seed, phase)), map_location="cpu", weights_only=True
    )
    sparse_name = next(p.name for p in recipe.phases if p.prunes)
    redense_name = recipe.names[recipe.names.index(sparse_name) + 1] if sparse_name != recipe.final else None
    dense, sparse = load("dense"), load(sparse_name)
    layer = representative_layer(sparse["pruner"]["shapes"])
    mask = unpack_mask(sparse["pruner"]["masks"][layer], sparse["pruner"]["shapes"][layer])
    panels = [
        ("after dense", dense["model"][layer].flatten()),
        ("after pruning", (dense["model"][layer] * mask).flatten()),
        (f"after sparse training ({sparse_name})", sparse["model"][layer].flatten()),
    ]
    if redense_name:
        panels.append((f"after re-dense ({redense_name})", load(redense_name)["model"][layer].flatten()))
    lim = float(dense["model"][layer].abs().max())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), sharey=True)
    for ax, (title, w) in zip(axes, panels, strict=True):
        w = w.float().numpy()
        nonzero = w[w != 0]
        ax.hist(nonzero, bins=80, range=(-lim, lim), color="#1f77b4")
        ax.set_title(f"{title}\nzeros: {100 * (1 - nonzero.size / w.size):.0f}%", fontsize=8)
        ax.set_xlabel("weight value")
    axes[0].set_ylabel(f"count ({row}: {layer})", fontsize=8)
    fig.tight_layout()
    return _save(fig, out, f"weights_{row}")


def captions(output_dir: str, row: str, seed: int, recipe: Recipe, out: Path, n: int = 6) -> list[Path]:
    from PIL import Image

    def read(phase):
        return read_eval(output_dir, row, seed, phase)["samples"]

    dense, dsd = read("dense"), read(recipe.final)
    n = min(n, len(dense))
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.6))
    for ax, base, ours in zip(np.atleast_1d(axes), dense[:n], dsd[:n], strict=True):
        ax.imshow(Image.open(base["image"]).convert("RGB"))
        ax.axis("off")
        text = "\n".join(
            textwrap.fill(f"{k}: {v}", 34)
            for k, v in (
                ("ref", base["reference"]),
                ("dense", base["hypothesis"]),
                ("DSD", ours["hypothesis"]),
            )
        )
        ax.set_title(text, fontsize=7, loc="left")
    fig.tight_layout()
    return _save(fig, out, f"captions_{row}")


def sweep(spec, seeds, output_dir: str, out: Path) -> list[Path]:
    rows = pd.DataFrame(sweep_rows(spec, seeds, output_dir))
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for split, style in (("val", "o-"), ("test", "s--")):
        x, y, err = 100 * rows["sparsity"], rows[f"{split}_mean"], rows[f"{split}_std"]
        # the bars are the seeds' SD, not the comparison table's confidence intervals: say so
        over = "mean, bars SD over seeds" if len(seeds) > 1 else "one seed, no bars"
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=f"{split}: {over}")
    _, chosen = chosen_final_phase(spec, seeds, output_dir)
    ax.axvline(100 * chosen, color="gray", linestyle=":", label=f"chosen on val: {100 * chosen:.0f}%")
    ax.set_xlabel("sparsity of the sparse phase, %")
    final = spec.recipe.phases[-1].kind  # a recipe may end sparse: no re-dense phase to name
    ax.set_ylabel(f"{rows['metric'][0]} after {'re-dense' if final == 'redense' else final}")
    ax.set_title(f"{spec.name}: metric vs sparsity ({counted(len(seeds), 'seed')})")
    # below the axes: no bar hidden
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    return _save(fig, out, f"sweep_{spec.name}")


def table_of(specs, seeds, path: Path) -> pd.DataFrame:
    """The comparison table's lines of these rows, in their order. The gains' bars are the table's and the dots and
    curves the runs of `seeds`: a table of other rows (`dsd table --row X` before, or `dsd plots --row X` after a
    whole table) or of another seed count would mix two sets of runs in one figure, so it is refused."""
    table = pd.read_csv(path)
    for row in specs:
        if row.name not in set(table["row"]):
            raise DSDError(f"{path}: no row {row.name} (run dsd table for the same rows and seeds first)")
    table = table.set_index("row").loc[[row.name for row in specs]].reset_index()
    other = sorted(set(table["n_seeds"]) - {len(seeds)})
    if other:
        raise DSDError(
            f"{path}: a table of {counted(other[0], 'seed')}, plots of {len(seeds)} (seeds {', '.join(map(str, seeds))}): "
            "run dsd table with the same --seeds first"
        )
    return table


ROW_FIGURES = tuple(f"{kind}_*.{ext}" for kind in ("weights", "captions", "sweep") for ext in ("png", "pdf"))


def write_plots(specs, seeds, output_dir: str, out: str | Path, part: str = "all") -> list[Path]:
    """`part`: "summary" (gains, curves), "rows" (each row's weights, captions, sweep) or "all"."""
    out = Path(out)
    recipes = {row.name: row.recipe for row in specs}
    comparison = table_of(specs, seeds, paths.tables_dir(output_dir) / "paper_comparison.csv")
    chosen = {
        row.name: row.recipe_of(phase) for row, phase in zip(specs, comparison["dsd_phase"], strict=True)
    }
    # a sweep's validation-chosen variant stands for DSD in every figure, as in the tables
    files = []
    if part in ("rows", "all"):
        paths.remove_row_files(out, ROW_FIGURES)
    if part in ("summary", "all"):
        files += gains(comparison, out, seed_gains(comparison, output_dir, seeds))
        files += curves(output_dir, seeds, recipes, out, chosen)
    for row in specs if part in ("rows", "all") else []:
        files += weight_histograms(output_dir, row.name, seeds[0], chosen[row.name], out)
        if row.track == "captioning":
            files += captions(output_dir, row.name, seeds[0], chosen[row.name], out)
        if row.sweep:
            files += sweep(row, seeds, output_dir, out)
    return files
