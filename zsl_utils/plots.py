"""Figure helpers shared by the notebooks (imported by them only, hence pyplot at the top)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from zsl_utils import config


def save_figure(fig: plt.Figure, name: str) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` and return the path; ``name`` starts with the notebook's number."""
    path = config.ensure_dir(config.FIGURES_DIR) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _panels(n: int, max_columns: int, width: float, height: float, sharey: bool = False):
    """``(fig, axes)`` for ``n`` panels in rows of at most ``max_columns``; spare panels hidden."""
    columns = min(max_columns, max(n, 1))
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False, sharey=sharey)
    for axis in axes.ravel()[n:]:
        axis.axis("off")
    return fig, axes.ravel()


def plot_conse_examples(images, titles, train_tops, conse_tops, conse_label: str = "ConSE", true_names=None):
    """Per image: the picture, top training labels and ConSE's top unseen labels (lists of ``(name, value)``);
    the true label, where ConSE lists it, is marked with ``>``."""
    fig, axes = plt.subplots(len(images), 3, figsize=(13, 2.4 * len(images)),
                             gridspec_kw={"width_ratios": [1, 1.6, 1.9]}, squeeze=False)
    for row, (image, title, train, conse) in enumerate(zip(images, titles, train_tops, conse_tops)):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(title, fontsize=10)
        truth = true_names[row] if true_names is not None else None
        for column, heading, pairs in ((1, "classifier top labels (p)", train),
                                       (2, f"{conse_label}: unseen labels (cos; > true)", conse)):
            lines = [f"{'>' if name == truth else ' '}{i + 1}. {name}  {value:.3f}" for i, (name, value) in enumerate(pairs)]
            axes[row, column].text(0.0, 0.95, heading + "\n" + "\n".join(lines), va="top", ha="left",
                                   family="monospace", fontsize=9, transform=axes[row, column].transAxes)
    for axis in axes.ravel():
        axis.axis("off")
    fig.tight_layout()
    return fig


def plot_hit_vs_T(table, title: str):
    """Zero-shot hit@k (%) against T (log axis); ``table``: index T, columns 'hit@k %'."""
    fig, axis = plt.subplots(figsize=(5.5, 3.6))
    axis.set_title(title, fontsize=10)
    for column in table.columns:
        axis.plot(table.index, table[column], marker="o", label=column.replace(" %", ""))
    axis.set(xscale="log", xlabel="T (top training labels combined)", ylabel="hit rate (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_norm_vs_confidence(norms, confidence, correlations):
    """Scatter of ||f(x)|| against the classifier's max probability and entropy (titles: Spearman's rho)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, column, label in ((axes[0], "max_prob", "max softmax probability"),
                                (axes[1], "entropy", "softmax entropy (nats)")):
        axis.scatter(confidence[column], norms, s=10, alpha=0.6)
        axis.set_xlabel(label)
        axis.set_title(f"Spearman rho = {correlations[column]:+.2f}", fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("||f(x)||  (ConSE embedding norm)")
    fig.tight_layout()
    return fig


def plot_hit_at_k_curves(table, ks=(1, 2, 5, 10, 20), metric: str = "hit", paper=None):
    """One panel per test set (shared y-axis): ``metric``@k (%) against k, one line per model, from
    ``evaluate_conse(...).table``; ``paper`` rows (same columns) are drawn dashed with open markers where known."""
    names = list(dict.fromkeys(table["test set"]))
    paper = table.iloc[:0] if paper is None else paper
    fig, axes = _panels(len(names), 3, 4.2, 3.2, sharey=True)
    for axis, name in zip(axes, names):
        part = table[table["test set"] == name]
        for _, row in part.iterrows():
            axis.plot(ks, [row[f"{metric}@{k}"] for k in ks], marker="o", label=row["model"])
        known = paper[paper["test set"] == name].dropna(subset=[f"{metric}@{k}" for k in ks], how="all")
        for _, row in known.iterrows():
            axis.plot(ks, [row[f"{metric}@{k}"] for k in ks], "--", marker="o", mfc="none", label=f"paper {row['model']}")
        axis.set(xscale="log", xlabel="k", ylabel=f"{metric}@k (%)", xticks=list(ks), xticklabels=[str(k) for k in ks])
        axis.set_title(f"{name} ({int(part['images'].iloc[0])} images)", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_hits_and_misses(images, true_names, predicted_names, hit_ranks, title: str):
    """Images with true (green if hit) and predicted labels; ``hit_ranks``: the true one's 1-based rank (0 = miss)."""
    fig, axes = _panels(len(images), 4, 3.4, 3.9)
    for axis, image, truth, predictions, rank in zip(axes, images, true_names, predicted_names, hit_ranks):
        axis.imshow(image)
        lines = [("> " if i + 1 == rank else "  ") + f"{i + 1}. {name}" for i, name in enumerate(predictions)]
        axis.set_title(f"true: {truth}", fontsize=8, color="green" if rank else "firebrick")
        axis.text(0.0, -0.02, "\n".join(lines), transform=axis.transAxes, va="top", ha="left",
                  family="monospace", fontsize=7)
        axis.set(xticks=[], yticks=[])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_huse_losses(history, title: str = "HUSE training losses", weights=None):
    """Three panels against the step: the total and each weighted part (log y; parts zero throughout left out),
    the classification loss per modality, the batch accuracy per modality. ``weights``: the run's ``LossWeights``
    (default: all 1)."""
    factor = {"classification": 1, "graph": 1, "gap": 1} if weights is None else \
        {"classification": weights.alpha, "graph": weights.beta, "gap": weights.gamma}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(history["step"], history["total"], label="total", lw=2)
    for part, weight in factor.items():
        if (weight * history[part] > 0).any():
            axes[0].plot(history["step"], (weight * history[part]).clip(lower=1e-6), label=f"{weight:g} x {part}")
    modalities = [c.split("_", 1)[1] for c in history.columns if c.startswith("accuracy_")]
    for m in modalities:
        axes[1].plot(history["step"], history[f"classification_{m}"], label=m)
        axes[2].plot(history["step"], 100 * history[f"accuracy_{m}"], label=m)
    axes[0].set(yscale="log", ylabel="loss (mean over logging window)", title="weighted loss parts")
    axes[1].set(yscale="log", ylabel="cross-entropy", title="classification loss per modality")
    axes[2].set(ylabel="accuracy on the batch (%)", title="training accuracy per modality", ylim=(0, 101))
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_embedding_projection(coords, groups, title: str = "HUSE space (shared 2-D PCA)"):
    """One panel per modality (``coords``: {modality: (N, 2)}), points coloured by ``groups`` (one name per item)."""
    names = sorted(set(groups))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    groups = np.asarray(groups)
    fig, axes = plt.subplots(1, len(coords), figsize=(5.2 * len(coords) + 1.8, 4.6), sharex=True, sharey=True,
                             squeeze=False)
    for axis, (modality, points) in zip(axes[0], coords.items()):
        for i, name in enumerate(names):
            axis.scatter(*points[groups == name].T, s=10, alpha=0.75, color=colours(i % colours.N), label=name)
        axis.set_title(f"{modality} embeddings", fontsize=10)
        axis.set_xlabel("PC 1")
        axis.grid(alpha=0.2)
    axes[0, 0].set_ylabel("PC 2")
    axes[0, -1].legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_huse_retrievals(image_queries, text_queries, max_chars: int = 48):
    """Retrievals of ``(image or text, label, [(text or image, label), ...])`` queries; the query's class green (✓)."""
    k = max([len(r) for _, _, r in image_queries + text_queries] or [1])
    rows = len(image_queries) + len(text_queries)
    fig, axes = plt.subplots(rows, k + 1, figsize=(2.1 * (k + 1), 2.2 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for row, (image, label, retrieved) in enumerate(image_queries):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(f"image query\n[{label}]", fontsize=8)
        for i, (text, l) in enumerate(retrieved):
            mark, colour = ("✓", "green") if l == label else ("✗", "red")
            axes[row, 1].text(0.0, 0.92 - i * 0.2, f"{i + 1}. {mark} {text[:max_chars]}", color=colour, fontsize=8,
                              transform=axes[row, 1].transAxes, va="top", ha="left", clip_on=False)
    for offset, (text, label, retrieved) in enumerate(text_queries):
        row = len(image_queries) + offset
        axes[row, 0].text(0.5, 0.5, f"text query\n\"{text[:max_chars]}\"\n[{label}]", ha="center", va="center",
                          fontsize=8, wrap=True, transform=axes[row, 0].transAxes)
        for i, (image, l) in enumerate(retrieved):
            axis = axes[row, i + 1]
            axis.imshow(image)
            axis.axis("on")
            axis.set(xticks=[], yticks=[])
            for spine in axis.spines.values():
                spine.set(edgecolor="green" if l == label else "red", linewidth=3)
            axis.set_title(f"{i + 1}. [{l}]", fontsize=7, color="green" if l == label else "red")
    fig.tight_layout()
    return fig
