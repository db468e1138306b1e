"""Figure helpers shared by the notebooks.

Every figure a notebook draws is saved under ``figures/`` with a name that starts
with the notebook's number, so README links and the notebook stay in step.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

from . import config


def save_figure(fig: "matplotlib.figure.Figure", name: str, directory: Path | None = None) -> Path:
    """Save ``fig`` as ``<directory>/<name>.png`` (default ``figures/``) and return the path."""
    target_dir = config.ensure_dir(Path(directory) if directory else config.FIGURES_DIR)
    path = target_dir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ---------------------------------------------------------------- ConSE (notebook 01)

def plot_conse_examples(images, titles, train_tops, conse_tops, conse_label: str = "ConSE"):
    """One row per image: the picture, its top training labels (probability) and ConSE's
    top unseen labels (cosine). ``train_tops``/``conse_tops``: lists of ``(name, value)``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(images), 3, figsize=(12, 2.4 * len(images)),
                             gridspec_kw={"width_ratios": [1, 1.6, 1.6]}, squeeze=False)
    for row, (image, title, train, conse) in enumerate(zip(images, titles, train_tops, conse_tops)):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(title, fontsize=10)
        for column, heading, pairs, fmt in ((1, "classifier top labels (p)", train, "{:.3f}"),
                                            (2, f"{conse_label}: unseen labels (cos)", conse, "{:.3f}")):
            lines = [f"{i + 1}. {name[:30]}  {fmt.format(value)}" for i, (name, value) in enumerate(pairs)]
            axes[row, column].text(0.0, 0.95, heading + "\n" + "\n".join(lines), va="top", ha="left",
                                   family="monospace", fontsize=9, transform=axes[row, column].transAxes)
    for axis in axes.ravel():
        axis.axis("off")
    fig.tight_layout()
    return fig


def plot_hit_vs_T(table):
    """Zero-shot hit@k (%) against T (log axis); ``table``: index T, columns 'hit@k %'."""
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5.5, 3.6))
    for column in table.columns:
        axis.plot(table.index, table[column], marker="o", label=column.replace(" %", ""))
    axis.set_xscale("log")
    axis.set_xlabel("T (top training labels combined)")
    axis.set_ylabel("hit rate (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_norm_vs_confidence(norms, confidence, correlations=None):
    """Scatter of ||f(x)|| against the classifier's max probability and entropy."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, column, label in ((axes[0], "max_prob", "max softmax probability"),
                                (axes[1], "entropy", "softmax entropy (nats)")):
        axis.scatter(confidence[column], norms, s=10, alpha=0.6)
        axis.set_xlabel(label)
        if correlations is not None:
            axis.set_title(f"Spearman rho = {correlations[column]:+.2f}", fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("||f(x)||  (ConSE embedding norm)")
    fig.tight_layout()
    return fig
