# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · HUSE: one space for images and texts that respects how classes relate
#
# A picture of ramen and the caption *"spicy miso ramen at home"* describe the same thing.
# **HUSE** (Narayana et al., *HUSE: Hierarchical Universal Semantic Embeddings*, 2019) learns
# a single space where both land close together, and where, beyond that, the distance
# between any two items mirrors how related their *classes* are: ramen should sit nearer to
# pho than to cheesecake, whether the items are photos or texts.
#
# This notebook trains HUSE on frozen features and evaluates it the way the paper does:
# classification accuracy, cross-modal retrieval recall@K, and hierarchical precision H@k.
# The default (demo) profile runs on a CPU in a few minutes with the Tux Paint stamps as a
# small real image + text + hierarchy set; the `food101_full` profile runs the same cells
# on UPMC Food-101 (on a GPU).

# %% tags=["parameters"]
profile_name: str = "demo"  # parameter profile that launched this run (set by the runner)
seed: int = 0  # seeds the splits, initial weights, dropout and batch order
device: str = "auto"  # compute device (one of: "auto", "cpu", "cuda", "cuda:*", "mps")
dataset: str = "tuxpaint"  # item source (one of: "tuxpaint", "upmc_food101")
data_root: str = ""  # UPMC Food-101 folder holding images/ and texts/ or texts_txt/; empty for the demo
verify_images: bool = False  # open every image while reading the item table (slow on 90k files)
min_items_per_class: int = 6  # demo only: classes with fewer stamps are dropped
test_fraction: float = 0.25  # demo only: share of each class held out for testing
val_fraction: float = 0.2  # share of each class's training items held out for validation
classifier_name: str = "efficientnet_lite0"  # classifier feeding the image tower: efficientnet_lite0, timm:<arch> or torchvision:<arch>
classifier_weights: str = ""  # optional local checkpoint for the classifier; empty means its default weights
text_kind: str = "minilm"  # text features (one of: "minilm", "bert", "tfidf")
bert_model: str = ""  # local Hugging Face folder used when text_kind is bert
batch_size: int = 32  # images per classifier forward pass during feature extraction (at least 1)
shard_size: int = 128  # images per feature-cache shard, the unit of resumption (at least 1)
num_workers: int = 0  # image-loading worker processes during extraction (at least 0)
extraction_processes: int = 1  # processes filling the cache (1: this notebook; N: torchrun on this machine) (at least 1)
compute_dtype: str = "float64"  # precision of the forward pass; float64 stores the same numbers on every CPU (one of: "float32", "float64")
torch_threads: int = 1  # CPU threads for torch; 0 keeps torch's default (1 is fastest on a busy shared CPU)
embedding_dim: int = 512  # D, the size of the shared space (at least 1)
num_steps: int = 600  # training steps of the final model (paper: 250000) (at least 1)
train_batch_size: int = 128  # items per training step (paper: 1024) (at least 1)
learning_rate: float = 0.001  # RMSProp learning rate (paper: 1.6192e-5 over 250k steps)
momentum: float = 0.9  # RMSProp momentum (paper: 0.9)
log_every: int = 50  # steps per point of the loss curves (at least 1)
checkpoint_every: int = 0  # steps between training checkpoints (0: none) (at least 0)
alpha: float = 1.0  # classification-loss weight (kept fixed; the grid varies the others)
graph_variant: str = "equation"  # graph loss (one of: "equation", "prose")
grid_steps: int = 300  # training steps of each grid-search model (at least 1)
grid_beta: list[float] = [1.0, 3.0]  # candidate graph-loss weights (non-empty)
grid_gamma: list[float] = [0.0, 1.0]  # candidate gap-loss weights (non-empty)
grid_margin: list[float] = [0.6]  # candidate margins zeta, cosine distance (non-empty)
recall_ks: list[int] = [1, 5, 10]  # K of recall@K
hierarchy_ks: list[int] = [2, 5, 10]  # k of hierarchical precision H@k
run_ablations: bool = True  # also train without the graph loss and separate per-modality models
n_examples: int = 3  # retrieval examples drawn per direction (at least 1)


# %%
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from zsl_utils import plots
from zsl_utils.classifiers import load_classifier
from zsl_utils.config import RUNS_DIR
from zsl_utils.device import pick_device, seed_everything
from zsl_utils.extract import cached_outputs
from zsl_utils.data.food101 import load_huse_dataset
from zsl_utils.huse.model import HuseArchitecture, build_splits, embed_split, semantic_class_distance
from zsl_utils.huse.evaluation import (choose_fusion_weight, evaluate_huse, project_2d, retrieval_examples,
                                 side_by_side)
from zsl_utils.huse.losses import LossWeights
from zsl_utils.huse.training import TrainConfig, best_weights, grid_search, seeded_repeat_check, train_huse, train_separate

seed_everything(seed)
torch_device = pick_device(device)
if torch_threads > 0:
    torch.set_num_threads(torch_threads)
# Each training run checkpoints into its own subfolder (named by its settings and data), so a rerun after an
# interruption continues every run where it stopped.
checkpoint_dir = RUNS_DIR / "03_huse_checkpoints" if checkpoint_every else None
architecture = HuseArchitecture(embedding_dim=embedding_dim)
final_config = TrainConfig(num_steps=num_steps, batch_size=train_batch_size, learning_rate=learning_rate,
                           momentum=momentum, log_every=log_every, seed=seed)
grid_config = TrainConfig(num_steps=grid_steps, batch_size=train_batch_size, learning_rate=learning_rate,
                          momentum=momentum, log_every=grid_steps, seed=seed)
data = load_huse_dataset(dataset, data_root, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                         min_items_per_class=min_items_per_class, verify_images=verify_images)
print(f"device={torch_device}, torch threads={torch.get_num_threads()}, dataset={data.name}: "
      f"{len(data.items)} items, {len(data.classes)} classes")
assert (architecture.hidden_dim, architecture.image_hidden_layers, architecture.text_hidden_layers,
        architecture.dropout) == (512, 5, 2, 0.15), "section 1 says 5 and 2 hidden layers of 512 units, dropout 0.15"


# %% [markdown]
# ## 1 · The method
#
# **Inputs are frozen.** Each item $i$ has an image feature $x_i$ (the pooled layer of a
# pretrained CNN) and a text feature $t_i$ (a sentence embedding), computed once and cached.
# The paper used 64-d Graph-RISE image embeddings, which are not public, and BERT + TF-IDF
# text features; we default to EfficientNet-Lite0 (1280-d) and MiniLM (384-d).
#
# **Two towers, one space.** The image tower $g$ has 5 hidden layers of 512 ReLU units, the
# text tower $h$ has 2; dropout (0.15) sits between hidden layers. Each ends in $D$ linear
# units that are L2-normalised, so every embedding lies on the unit sphere:
#
# $$u_i = \frac{g(x_i)}{\lVert g(x_i)\rVert}, \qquad v_i = \frac{h(t_i)}{\lVert h(t_i)\rVert}.$$
#
# **One shared classifier.** A single linear layer $W$ scores both: $\mathrm{softmax}(W u_i)$ and
# $\mathrm{softmax}(W v_i)$. Because the *same* $W$ must classify both modalities, the two
# towers are pushed towards the same regions of the space.
#
# **Three losses.** With $d(a, b) = 1 - \frac{a^\top b}{\lVert a\rVert\lVert b\rVert}$ the cosine distance:
#
# * *classification*: cross-entropy of $W u_i$ and of $W v_i$ against the class $c_i$;
# * *semantic graph*: the class names are embedded with a sentence encoder $\psi$ (the paper
#   used the Universal Sentence Encoder; we use MiniLM) and
#   $A_{jk} = d(\psi(\text{class}_j), \psi(\text{class}_k))$. Stack the batch's $2N$ embeddings
#   $e_1, \dots, e_{2N}$ (images and texts) with their classes; for every ordered pair
#
#   $$\sigma_{mn} = \mathbb{1}\left[A_{c_m c_n} < \zeta \;\text{and}\; d(e_m, e_n) < \zeta\right] \quad\text{(Eq. 10)},$$
#   $$L_{\text{graph}} = \frac{1}{(2N)^2} \sum_{m,n} \sigma_{mn}\,\bigl(d(e_m, e_n) - A_{c_m c_n}\bigr)^2 \quad\text{(Eq. 11)}.$$
#
#   Pairs of related classes that are already within the margin $\zeta$ are pulled to the
#   distance their classes have in the sentence space. Read literally, Eq. 10 ignores every
#   other pair; the paper's prose also asks pairs of *unrelated* classes to sit at least
#   $\zeta$ apart. `graph_variant="prose"` adds $\max(0, \zeta - d(e_m, e_n))^2$ for pairs with
#   $A_{c_m c_n} \ge \zeta$; the default is the equation as printed.
# * *gap*: $L_{\text{gap}} = \frac{1}{N}\sum_i d(u_i, v_i)$ (Eq. 12), the image and text of one
#   item should coincide.
#
# The objective is $L = \alpha L_{\text{class}} + \beta L_{\text{graph}} + \gamma L_{\text{gap}}$,
# minimised with RMSProp (paper: learning rate $1.6192\cdot10^{-5}$, momentum 0.9, batch 1024,
# 250k steps). The paper does not give $\alpha, \beta, \gamma, \zeta$; we choose them on a
# validation split (section 5).
#
# **Classification at test time** averages the two softmax outputs,
# $p = w\, \mathrm{softmax}(W u) + (1 - w)\, \mathrm{softmax}(W v)$, with the image weight $w$
# chosen on validation.

# %% [markdown]
# ## 2 · The data
#
# *Demo*: each Tux Paint stamp is an item: its picture, its English description (the first
# line of `NAME.txt`, e.g. *"A badger."*) and its class, the category folder
# (`animals/mammals`). The folder tree is the hierarchy: a class's parent is its top folder
# (`animals`). Classes too small to be split into train / validation / test are dropped.
#
# *Full profile*: UPMC Food-101 (101 dishes, web images with the title of their page), in
# either the common mirror layout or the original release; the official test split is kept
# and a stratified validation split is carved out of train. The hierarchy for H@k is a
# reviewed map of the 101 classes onto WordNet 3.0 synsets
# (`zsl_utils/tables/food101_wordnet.csv`; the paper's taxonomy was never released).
#
# Rows that cannot be used (missing or unreadable image, empty text, unknown class, class too
# small) are not silently dropped: they are counted and listed.

# %%
# NBVAL_CHECK_OUTPUT
print(data.skipped["reason"].value_counts().to_string() if len(data.skipped) else "no rows skipped")
data.split_counts()

# %%
data.items.groupby("split").head(1)[["split", "label", "text", "image_path"]]

# %% [markdown]
# ## 3 · Frozen features, extracted once
#
# Image features are the pooled penultimate layer of the classifier; text features the
# sentence embedding of the text. Both go through the project's sharded cache: a rerun reads
# them back instantly, an interrupted extraction resumes, and a cache made by another model
# or for another item list is refused. Items whose image could not be decoded are listed and
# left out of training and evaluation.
#
# With `extraction_processes` > 1 (say, the number of GPUs), the same two cache folders are
# first filled by that many processes launched with `torchrun` (each takes every N-th shard;
# `zsl_utils.scale.extract`, see `docs/DISTRIBUTED.md`), and the two calls below then only
# read them. Only the MiniLM text features have a distributed
# path; TF-IDF and BERT-style text features are always computed here.

# %%
cache_id = data.name  # the cache folders also carry a hash of model and items
image_paths, texts = data.items["image_path"].tolist(), data.items["text"].tolist()
train_texts = data.items.loc[data.items["split"] == "train", "text"].tolist()
classifier = load_classifier(classifier_name, weights=classifier_weights or None, device=torch_device)
image = cached_outputs("image_features", image_paths, classifier, dataset_id=cache_id, processes=extraction_processes,
                       batch_size=batch_size, shard_size=shard_size, num_workers=num_workers, compute_dtype=compute_dtype)
text = cached_outputs("text_features", texts, text_kind, dataset_id=cache_id, processes=extraction_processes,
                      fit_texts=train_texts, bert_model=bert_model or None, device=torch_device,
                      compute_dtype=compute_dtype)
image_features, text_features = image.load(), text.load()
splits, unusable = build_splits(data.items, data.classes, image_features, text_features, image.ok & text.ok)
print(f"image features {image_features.shape}, text features {text_features.shape}; "
      f"{len(unusable)} items without usable features")
assert classifier_name != "efficientnet_lite0" or image_features.shape[1] == 1280, "section 1 says 1280-d image features"
assert text_kind != "minilm" or text_features.shape[1] == 384, "section 1 says 384-d MiniLM text features"
unusable[["item_id", "image_path"]].head()

# %% [markdown]
# ## 4 · The semantic graph
#
# Each class name becomes a short phrase (`apple_pie` → *apple pie*; `animals/mammals` →
# *mammals (animals)*) embedded by MiniLM; $A$ holds their cosine distances. The closest
# pairs show what the graph loss will try to keep close in the learned space.

# %%
# Outside the checked cell below: loading MiniLM here (when the text cache is warm) draws a progress bar.
class_distance = semantic_class_distance(data.phrases, device=str(torch_device), compute_dtype=compute_dtype)

# %%
# NBVAL_CHECK_OUTPUT
upper = torch.triu_indices(len(data.classes), len(data.classes), offset=1)
pairs = pd.DataFrame({"class a": [data.classes[i] for i in upper[0].tolist()],
                      "class b": [data.classes[j] for j in upper[1].tolist()],
                      "A (cosine distance)": class_distance[upper[0], upper[1]].numpy()})
print(f"A: {len(data.classes)} x {len(data.classes)}, off-diagonal median {pairs.iloc[:, 2].median():.3f}")
assert (pairs.iloc[:, 2].nsmallest(8) < min(grid_margin)).all(), \
    "the text says the graph loss tries to keep the closest pairs close: their A must be below the margin zeta"
pairs.sort_values("A (cosine distance)").head(8).round(3)

# %% [markdown]
# ## 5 · Choosing α, β, γ, ζ on the validation split
#
# The paper leaves the loss weights and the margin unspecified. We fix $\alpha$ and train one
# model per combination of the candidate $\beta$, $\gamma$, $\zeta$ on the training split
# (`grid_steps` steps each), then score it on the validation split. The selection criterion
# is the mean recall@1 over the four retrieval directions, the quantity the embedding is
# for; the other validation numbers are shown for reference.
#
# The library defaults (`LossWeights()`: $\alpha = 1, \beta = 1, \gamma = 0, \zeta = 0.6$, Eq. 10 as
# printed) came from an earlier, larger grid of this kind on the demo's validation split (24
# combinations, then three seeds for $\gamma$); that search is not rerun here. What this
# notebook's grid chose, and by how much, is printed under its table. The validation split
# is small and the grid is one seed, so a difference of a few points between rows is not yet
# a finding: the seed-to-seed spread has not been measured (the next issue adds 5-seed error
# bars). A full run repeats the search on Food-101's validation split, where the paper's
# setting (all three losses) may win.

# %%
# NBVAL_CHECK_OUTPUT
correct_sets = data.taxonomy.correct_sets(hierarchy_ks)
grid = grid_search(splits["train"], splits["val"], class_distance,
                   {"beta": grid_beta, "gamma": grid_gamma, "margin": grid_margin},
                   base_weights=LossWeights(alpha=alpha, graph_variant=graph_variant), config=grid_config,
                   architecture=architecture, correct_sets=correct_sets, device=torch_device, progress=False,
                   checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
chosen = best_weights(grid)
print(f"chosen on validation: alpha={chosen.alpha}, beta={chosen.beta}, gamma={chosen.gamma}, zeta={chosen.margin}")
assert (LossWeights().alpha, LossWeights().beta, LossWeights().gamma, LossWeights().margin) == (1, 1, 0, 0.6), \
    "the text gives the library defaults as alpha=1, beta=1, gamma=0, zeta=0.6"
assert len(grid) == len(grid_beta) * len(grid_gamma) * len(grid_margin), "the text says one model per combination"
grid.drop(columns=["alpha", "graph_variant"]).round(2)

# %%
best_per_gamma = grid.groupby("gamma")["mean_R@1"].max()
lead = (f"; the chosen row leads the next (beta={grid['beta'].iloc[1]:g}, gamma={grid['gamma'].iloc[1]:g}) by "
        f"{grid['mean_R@1'].iloc[0] - grid['mean_R@1'].iloc[1]:.2f} points") if len(grid) > 1 else ""
print(f"The grid chose gamma = {chosen.gamma:g}, so the final model is trained "
      f"{'without' if chosen.gamma == 0 else 'with'} the gap loss. Best validation mean R@1 per gamma: "
      + ", ".join(f"{g:g}: {r:.1f}" for g, r in best_per_gamma.items()) + lead + ".")
print(f"One seed on {len(splits['val'].labels)} validation items: the seed-to-seed spread of these numbers is "
      "not measured yet, so this ranking is one run's, not a finding.")

# %% [markdown]
# ## 6 · Training the final model
#
# The chosen weights, trained for `num_steps` steps. The curves are the mean of each loss
# over the steps between two points. The gap loss is always measured, even with weight 0,
# so the curve shows how close each image gets to its own text in a batch whatever its
# weight; its first and last values are printed under the plot.
#
# With `checkpoint_every` > 0, every training in this notebook (grid, final model,
# ablations) saves its full state every that many steps; if the kernel dies, running the
# notebook again continues each training from its last checkpoint and ends with exactly
# the weights an uninterrupted run would have (`zsl_utils.huse.training.train_huse`). Training
# on several GPUs runs from the command line with `torchrun`, see `docs/DISTRIBUTED.md`.

# %%
trained = train_huse(splits["train"], class_distance, chosen, final_config, architecture, torch_device,
                     checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
figure = plots.plot_huse_losses(trained.history, f"HUSE training on {data.name} ({num_steps} steps)", chosen)
gap_curve = trained.history.set_index("step")["gap"]
print(f"gap loss (weight {chosen.gamma:g}): {gap_curve.iloc[0]:.3f} at step {gap_curve.index[0]}, "
      f"{gap_curve.iloc[-1]:.3f} at step {gap_curve.index[-1]}")
plots.save_figure(figure, "03_huse_loss_curves")

# %% [markdown]
# ## 7 · Evaluation on the test split
#
# * **Classification**: accuracy of the image softmax, the text softmax and their fusion,
#   whose image weight $w$ is chosen on validation.
# * **Retrieval recall@K**: every test item is a query against all *other* test items (its own
#   image/text pair excluded); a query scores when an item of its class is among the K
#   nearest by cosine. Four directions: image→image, image→text, text→image, text→text.
# * **Hierarchical precision H@k**: for the query's class $y$, grow a ring in the hierarchy
#   until it holds at least $k$ classes ($S_k(y)$, as in DeViSE and ConSE); H@k is the share
#   of the $k$ nearest items whose class lies in $S_k(y)$. It rewards near misses:
#   retrieving pho for a ramen query counts at $k \ge 2$.
#
# On the demo's two-level folder tree, a class's ring reaches every class once it holds more
# than its siblings, so H@10 (and often H@5) counts every retrieved item as right: it is 100%
# by construction there and only informative on the deeper Food-101 taxonomy.
#
# The paper's numbers sit beside ours where we could enter them reliably
# (`zsl_utils/tables/paper_huse.csv`; the others are left empty rather than guessed). They
# are on UPMC Food-101 with other features, so the demo's numbers are not comparable to them.

# %%
# NBVAL_CHECK_OUTPUT
fusion_weight = choose_fusion_weight(embed_split(trained.model, splits["val"], torch_device))
test_outputs = embed_split(trained.model, splits["test"], torch_device)
evaluation = evaluate_huse(test_outputs, fusion_weight, correct_sets, ks=recall_ks)
print(f"image weight of the fusion, chosen on validation: w = {fusion_weight:.2f}")
assert (evaluation.classification["accuracy"] > 100 / len(data.classes)).all(), "every accuracy should beat chance 1/K"
side_by_side(evaluation.classification, "classification").round(1)

# %%
# NBVAL_CHECK_OUTPUT
side_by_side(evaluation.retrieval, "retrieval").round(1)

# %%
# NBVAL_CHECK_OUTPUT
if dataset == "tuxpaint":
    k_top, k_mid = max(hierarchy_ks), sorted(hierarchy_ks)[-2]
    assert all(len(s) == len(data.classes) for s in correct_sets[k_top]) and \
        (evaluation.hierarchical[f"H@{k_top}"] > 100 - 1e-9).all(), f"the text says H@{k_top} is 100% by construction here"
    assert np.mean([len(s) == len(data.classes) for s in correct_sets[k_mid]]) >= 0.3, \
        f"the text says H@{k_mid} often counts every class as right on the demo's tree"
side_by_side(evaluation.hierarchical, "hierarchical").round(1)


# %% [markdown]
# ## 8 · Ablations
#
# * **without the graph loss** ($\beta = 0$): same training otherwise; tests what the
#   semantic graph adds, especially to H@k.
# * **separate models**: one single-modality model per modality (classification and graph
#   losses on its own embeddings, no gap loss). Their spaces are never aligned, so
#   cross-modal retrieval between them shows what joint training buys (chance level is
#   about one over the number of classes).
#
# The demo's test split has under 200 items and every row is one seed, so a difference of a
# few points between these rows cannot yet be told from sampling and seed-to-seed noise
# (not measured yet; the next issue adds 5-seed error bars). The sentences printed under the
# table say what this run shows.

# %%
# NBVAL_CHECK_OUTPUT
def headline(evaluation_result):
    row = {f"acc {k}": v for k, v in evaluation_result.classification["accuracy"].items()}
    row.update({f"R@1 {d}": v for d, v in evaluation_result.retrieval.iloc[:, 0].items()})
    row.update({f"{evaluation_result.hierarchical.columns[0]} {d}": v
                for d, v in evaluation_result.hierarchical.iloc[:, 0].items()})
    return row

ablations = {"HUSE": headline(evaluation)}
if run_ablations:
    no_graph = train_huse(splits["train"], class_distance, LossWeights(chosen.alpha, 0.0, chosen.gamma, chosen.margin),
                          final_config, architecture, torch_device, progress=False, checkpoint_dir=checkpoint_dir,
                          checkpoint_every=checkpoint_every)
    w_no_graph = choose_fusion_weight(embed_split(no_graph.model, splits["val"], torch_device))
    ablations["without graph loss"] = headline(evaluate_huse(embed_split(no_graph.model, splits["test"], torch_device),
                                                             w_no_graph, correct_sets, ks=recall_ks))
    separate = {m: t.model for m, t in train_separate(splits["train"], class_distance, chosen, final_config,
                                                      architecture=architecture, device=torch_device, progress=False,
                                                      checkpoint_dir=checkpoint_dir,
                                                      checkpoint_every=checkpoint_every).items()}
    w_separate = choose_fusion_weight(embed_split(separate, splits["val"], torch_device))
    ablations["separate models"] = headline(evaluate_huse(embed_split(separate, splits["test"], torch_device),
                                                          w_separate, correct_sets, ks=recall_ks))
assert dataset != "tuxpaint" or len(splits["test"].labels) < 200, "the text says the demo's test split has under 200 items"
pd.DataFrame(ablations).round(1)

# %%
if run_ablations:
    table, chance = pd.DataFrame(ablations), 100 / len(data.classes)
    cross = ["R@1 image->text", "R@1 text->image"]
    assert (table.loc[cross, "HUSE"] > 3 * chance).all(), "the takeaway says joint training aligns the modalities"
    assert (table.loc[cross, "separate models"] < table.loc[cross, "HUSE"] / 2).all(), \
        "the takeaway says separately trained towers retrieve across modalities far worse than HUSE"
    print(f"Cross-modal R@1 (chance about {chance:.1f}%): HUSE {table.loc[cross, 'HUSE'].round(1).tolist()}, "
          f"separate models {table.loc[cross, 'separate models'].round(1).tolist()}.")
    change = table["without graph loss"] - table["HUSE"]
    print(f"Without the graph loss, {int((change >= 0).sum())} of {len(change)} numbers are as high as or higher than "
          f"full HUSE's (differences {change.min():+.1f} to {change.max():+.1f} points). This is one seed, whose "
          "spread is not measured yet, so this run "
          + ("does not show that the graph loss helps." if (change >= 0).any() else
             "is only a hint that the graph loss helps, until the 5-seed error bars."))

# %% [markdown]
# ## 9 · The learned space
#
# A 2-D PCA computed once on the image and text test embeddings together (so both panels
# share axes), coloured by superclass: the top Tux Paint folder in the demo, the coarse
# WordNet group of the dish for Food-101. How alike the two panels look is a reading by eye;
# the line printed under them gives the number behind it, how far each image lies from its
# own text compared with the other items' texts (cosine distance in the full space). The
# plot alone does not show what the graph loss adds; section 8 compares a model without it.

# %%
coords = project_2d(test_outputs.embeddings)
superclass = [data.taxonomy.superclass[data.classes[i]] for i in test_outputs.labels.tolist()]
figure = plots.plot_embedding_projection(coords, superclass, f"HUSE test embeddings on {data.name} (shared 2-D PCA)")
pair_distance = 1 - test_outputs.embeddings["image"].double() @ test_outputs.embeddings["text"].double().T
own_text = pair_distance.diagonal().mean().item()
other_texts = pair_distance[~torch.eye(len(pair_distance), dtype=torch.bool)].mean().item()
print(f"gap-loss weight {chosen.gamma:g}; mean cosine distance of a test image to its own text {own_text:.2f}, "
      f"to the other items' texts {other_texts:.2f}")
plots.save_figure(figure, "03_huse_projection")

# %% [markdown]
# ## 10 · Retrieval across modalities
#
# Random test items (seeded): each image retrieves the nearest *texts*, each text the nearest
# *images*, the item's own pair excluded. Green marks an item of the query's class.

# %%
image_queries, text_queries = retrieval_examples(test_outputs, splits["test"].items, n_queries=n_examples, k=5,
                                                 seed=seed)
figure = plots.plot_huse_retrievals(image_queries, text_queries)
plots.save_figure(figure, "03_huse_retrievals")

# %% [markdown]
# ## 11 · Reproducibility
#
# Everything random follows `seed`: the splits, the initial weights, dropout and the batch
# order. Two short trainings with the same seed must give bit-identical weights on a CPU
# (on a GPU, only with deterministic kernels).

# %%
# NBVAL_CHECK_OUTPUT
short = TrainConfig(num_steps=20, batch_size=train_batch_size, learning_rate=learning_rate, momentum=momentum, seed=seed)
identical = seeded_repeat_check(splits["train"], class_distance, weights=chosen, config=short,
                                architecture=architecture, device=torch_device)
print("identical weights after two seeded trainings:", identical)
assert identical or torch_device.type != "cpu", "the text says seeded trainings are bit-identical on a CPU"

# %% [markdown]
# ## What to take away
#
# * HUSE is three ordinary losses on two small towers over frozen features. Training the
#   towers jointly is what aligns the modalities here: cross-modal R@1 is well above chance
#   and far above that of towers trained separately (section 8). Whether the gap loss is
#   part of the final model is the validation grid's choice (printed in section 5), and one
#   seed does not show what the graph loss adds (section 8); the 5-seed error bars of the
#   next issue are needed before either comparison is a finding.
# * The paper leaves $\alpha, \beta, \gamma, \zeta$ open; here they are chosen on a validation
#   split, and Eq. 10 as printed (pairs of unrelated classes are not pushed apart) is the
#   default, with the prose reading available as an option.
# * The demo's numbers come from clip-art stamps and one-line descriptions, not from the
#   paper's data and encoders; the full profile runs the same notebook on UPMC Food-101.
