"""Figures from finished runs (matplotlib, PNG for the README and PDF for papers).

- gains.png: relative gain of DSD over its baseline and over the equal-epoch control, ours vs the paper's.
- curves.png: validation metric and training loss per epoch across the phases, control overlaid.
- weights_<row>.png: one layer's weight histogram after dense, after pruning, after sparse training, after
  re-dense (the paper's distribution figure).
- captions.png: test images with the reference and the dense and DSD captions (captioning rows).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from dsd import paths  # noqa: E402
from dsd.core.masks import unpack_mask  # noqa: E402
from dsd.core.schedule import CONTROL, Recipe  # noqa: E402
from dsd.report.tables import chosen_final_phase, read_eval, read_metrics, rel_gain_pct, sweep_rows  # noqa: E402


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(files[0], dpi=130, bbox_inches="tight")
    fig.savefig(files[1], bbox_inches="tight")
    plt.close(fig)
    return files


def gains(
    comparison: pd.DataFrame, output_dir: str, seeds, recipes: dict[str, Recipe], out: Path
) -> list[Path]:
    rows = list(comparison["row"])
    dsd_phase = dict(zip(comparison["row"], comparison["dsd_phase"], strict=True))  # sweeps: the chosen one
    ours_base, ours_ctrl = [], []
    for row in rows:
        per_seed_base, per_seed_ctrl = [], []
        for seed in seeds:
            dense = read_eval(output_dir, row, seed, "dense")
            final = read_eval(output_dir, row, seed, dsd_phase[row])
            control = read_eval(output_dir, row, seed, CONTROL)
            metric, higher = dense["metric"], dense["higher_is_better"]
            value = final["test"][metric]
            per_seed_base.append(rel_gain_pct(dense["test"][metric], value, higher))
            per_seed_ctrl.append(rel_gain_pct(control["test"][metric], value, higher))
        ours_base.append(per_seed_base)
        ours_ctrl.append(per_seed_ctrl)
    x = np.arange(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 3.8))
    ax.bar(
        x - width, comparison["paper_rel_gain_pct"], width, label="paper: DSD vs baseline", color="#999999"
    )
    for offset, values, label, color in (
        (0, ours_base, "ours: DSD vs baseline", "#1f77b4"),
        (width, ours_ctrl, "ours: DSD vs equal-epoch control", "#d62728"),
    ):
        means = [np.mean(v) for v in values]
        errs = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
        ax.bar(x + offset, means, width, yerr=errs, capsize=3, label=label, color=color)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{r}\n({m})" for r, m in zip(rows, comparison["metric"], strict=True)], fontsize=8)
    ax.set_ylabel("relative gain, % (positive = better)")
    ax.set_title(f"DSD gains: ours (mean ± std over {len(seeds)} seeds) vs the paper")
    ax.legend(fontsize=8)
    return _save(fig, out, "gains")


def curves(output_dir: str, seeds, recipes: dict[str, Recipe], out: Path) -> list[Path]:
    rows = list(recipes)
    fig, axes = plt.subplots(2, len(rows), figsize=(3.6 * len(rows), 5.5), squeeze=False)
    for col, row in enumerate(rows):
        top, bottom = axes[0][col], axes[1][col]
        for seed in seeds:
            history, boundaries = [], []
            for phase in recipes[row].names:
                history += read_metrics(output_dir, row, seed, phase)["history"]
                boundaries.append(len(history))
            metric = read_metrics(output_dir, row, seed, "dense")["metric"]
            dense_epochs = boundaries[0]
            control = read_metrics(output_dir, row, seed, CONTROL)["history"]
            epochs = np.arange(1, len(history) + 1)
            control_epochs = np.arange(dense_epochs + 1, dense_epochs + len(control) + 1)
            label = seed == seeds[0]
            top.plot(
                epochs,
                [h["val"][metric] for h in history],
                color="#1f77b4",
                alpha=0.7,
                label="DSD" if label else None,
            )
            top.plot(
                control_epochs,
                [h["val"][metric] for h in control],
                color="#d62728",
                alpha=0.7,
                linestyle="--",
                label="control" if label else None,
            )
            bottom.plot(epochs, [h["train_loss"] for h in history], color="#1f77b4", alpha=0.7)
            bottom.plot(
                control_epochs, [h["train_loss"] for h in control], color="#d62728", alpha=0.7, linestyle="--"
            )
        for ax in (top, bottom):
            for b, phase in zip(boundaries[:-1], recipes[row].names[1:], strict=True):
                ax.axvline(b + 0.5, color="gray", linewidth=0.7, linestyle=":")
                if ax is top:
                    ax.text(b + 0.6, 1.0, phase, transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        top.set_title(row)
        top.set_ylabel(f"val {metric} (monitor)")
        bottom.set_ylabel("train loss")
        bottom.set_xlabel("epoch")
        top.legend(fontsize=7)
    fig.tight_layout()
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
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=split)
    _, chosen = chosen_final_phase(spec, seeds, output_dir)
    ax.axvline(100 * chosen, color="gray", linestyle=":", label=f"chosen on val: {100 * chosen:.0f}%")
    ax.set_xlabel("sparsity of the sparse phase, %")
    ax.set_ylabel(f"{rows['metric'][0]} after re-dense")
    ax.set_title(f"{spec.name}: metric vs sparsity ({len(seeds)} seeds)")
    ax.legend(fontsize=8)
    return _save(fig, out, f"sweep_{spec.name}")


def write_plots(specs, seeds, output_dir: str, out: str | Path) -> list[Path]:
    out = Path(out)
    recipes = {row.name: row.recipe for row in specs}
    comparison = pd.read_csv(paths.tables_dir(output_dir) / "paper_comparison.csv")
    files = gains(comparison, output_dir, seeds, recipes, out) + curves(output_dir, seeds, recipes, out)
    for row in specs:
        files += weight_histograms(output_dir, row.name, seeds[0], row.recipe, out)
        if row.track == "captioning":
            files += captions(output_dir, row.name, seeds[0], row.recipe, out)
        if row.sweep:
            files += sweep(row, seeds, output_dir, out)
    return files
