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
# # 02 · ImageNet zero-shot evaluation: the ConSE protocol, cached and resumable
#
# Notebook 01 built ConSE and looked at single images. This notebook measures it the way
# the ConSE paper (Norouzi et al., ICLR 2014) and DeViSE (Frome et al., NeurIPS 2013) do:
# a classifier trained on the 1,000 ILSVRC-2012 classes labels images of ImageNet classes
# it never saw, choosing among thousands of candidate labels, and we count how often the
# right label is near the top (**flat hit@k**) and how often the top labels are at least
# *close* to the right one in the WordNet hierarchy (**hierarchical precision@k**).
#
# * **demo profile** (default, CPU, minutes): the unseen test images are Tux Paint stamps
#   whose names denote ImageNet synsets, the seen-class images the 1,000 real ImageNet sample
#   photos (one per training class);
# * **full profile**: set `imagenet21k_root` (the fall-2011 release extracted one folder per
#   synset) and optionally `ilsvrc2012_val_root`.
#
# The classifier's softmax outputs are computed once and cached on disk in shards; a rerun,
# or a rerun after an interrupt, reuses every finished shard, so all ConSE variants below
# are evaluated from the cache without running the classifier again (section 9 prints how
# long the evaluation took).

# %% tags=["parameters"]
profile_name: str = "demo"  # parameter profile that launched this run (set by the runner)
seed: int = 0  # random seed (example picking)
device: str = "auto"  # compute device (one of: "auto", "cpu", "cuda", "cuda:*", "mps")
classifier_name: str = "efficientnet_lite0"  # classifier: efficientnet_lite0, timm:<arch> or torchvision:<arch>
classifier_weights: str = ""  # optional local checkpoint for the classifier; empty means its default weights
semantic_space: str = "glove-6b-50d"  # label embeddings: "glove-6b-50d", "minilm" (sentence encoder) or a word-vector file
imagenet21k_root: str = ""  # ImageNet fall-2011 images as <root>/<wnid>/*.JPEG; empty runs the Tux Paint demo
ilsvrc2012_val_root: str = ""  # optional ILSVRC-2012 val images as <root>/<wnid>/*.JPEG (seen-class images)
max_images_per_class: int = 0  # use at most this many images per class (0 keeps all) (at least 0)
published_2hop_file: str = ""  # optional published 2-hop WNID list (text, one per line, or the JSON with key "2-hops") replacing the derived set
published_3hop_file: str = ""  # optional published 3-hop WNID list (text, or JSON key "3-hops") replacing the derived set
published_all_file: str = ""  # optional published "all" WNID list (text, or JSON key "all") replacing the derived set
imagenet_sample_dir: str = ""  # demo: ImageNet sample photos <wnid>_<name>.JPEG (seen images); empty: the copy make data fetched
unit_label_vectors: bool = False  # unit-normalise the training-label vectors before combining them (notebook 01, section 8)
stamps_dir: str = ""  # Tux Paint stamps folder for the demo; empty means the copy fetched into data/raw
cache_dir: str = ""  # folder for cached classifier outputs (created if missing); empty means data/cache
T_values: list[int] = [1, 10, 1000]  # ConSE's T: how many top training labels are combined (at least 1) (non-empty)
ks: list[int] = [1, 2, 5, 10, 20]  # cut-offs k of hit@k and hp@k (at least 1) (non-empty) (increasing)
batch_size: int = 64  # images per classifier forward pass (at least 1)
num_workers: int = 0  # DataLoader processes decoding images (0 decodes in the notebook process) (at least 0)
extraction_processes: int = 1  # processes filling the cache (1: this notebook; N: torchrun on this machine) (at least 1)
compute_dtype: str = "float64"  # precision of the forward pass; float64 stores the same numbers on every CPU (one of: "float32", "float64")
image_decode: str = "pil"  # how images are decoded: "pil" exactly; "pil_draft" (JPEG DCT scaling) and "torchvision" (JPEGs decoded on the GPU) are faster, within the README's tolerances (one of: "pil", "pil_draft", "torchvision")
autocast: str = "none"  # mixed precision of the classifier on a GPU (CPU: ignored); needs compute_dtype float32 (one of: "none", "bfloat16", "float16")
shard_size: int = 1024  # images per cache shard, the unit of resumption (at least 1)
eval_batch_size: int = 4096  # cached rows ranked at once during evaluation (at least 1)
n_examples: int = 4  # hits and misses shown in the example figure (at least 0)
ilsvrc2012_train_root: str = ""  # DeViSE training images <root>/<wnid>/*.JPEG (ILSVRC-2012 train); empty: the ImageNet sample photos
max_train_images_per_class: int = 0  # DeViSE: at most this many training images per class (0 keeps all) (at least 0)
devise_views: int = 3  # demo: views per sample photo for DeViSE (original, mirrored, centre crop, mirrored crop) (at least 1)
devise_seeds: list[int] = [0, 1, 2]  # one DeViSE training per seed; its rows are mean ± sd over them (non-empty)
devise_steps: int = 1000  # DeViSE training steps (at least 1)
devise_batch_size: int = 256  # DeViSE images per step (at least 1)
devise_learning_rate: float = 0.001  # DeViSE Adam step size
devise_margin: float = 0.1  # DeViSE hinge margin (DeViSE's value)


# %%
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from zsl_utils import config, plots
from zsl_utils.conse import imagenet
from zsl_utils.conse import devise
from zsl_utils.conse import model as conse
from zsl_utils.metrics import difference_counts, mean_sd_text, seed_spread
from zsl_utils.classifiers import load_classifier
from zsl_utils.data.wnids import wnid_lemmas
from zsl_utils.data.images import augmented_views, image_folder_by_wnid, imagenet_sample_photos, load_image_rgb
from zsl_utils.device import pick_device, seed_everything
from zsl_utils.extract import cached_outputs
from zsl_utils.semantic import embed_labels, load_word_vectors
from zsl_utils.data.tuxpaint import load_stamps, tuxpaint_by_wnid
from zsl_utils.data.wordnet import WordNet
from zsl_utils.parameters import check_parameter_types

check_parameter_types(globals())  # a value of the wrong type (papermill -p x abc) is named here
seed_everything(seed)
torch_device = pick_device(device)
mode = "full" if imagenet21k_root else "demo"
outputs_dir = Path(cache_dir) if cache_dir else config.CACHE_DIR / "classifier_outputs"
image_settings = dict(compute_dtype=compute_dtype, decode=image_decode,  # how the classifier reads images
                      autocast_dtype=None if autocast == "none" else autocast)
published = {name: path for name, path in (("2-hop", published_2hop_file), ("3-hop", published_3hop_file),
                                           ("all", published_all_file)) if path}
wordnet = WordNet.load()
hierarchy = imagenet.wordnet_hierarchy(wordnet)
print(f"mode={mode}, device={torch_device}, T={T_values}, k={ks}, outputs cached in {outputs_dir}")


# %% [markdown]
# ## 1 · Label spaces and test sets
#
# * **Training labels** $\mathcal{Y}_0$: the 1,000 ILSVRC-2012 synsets, the classifier's outputs.
# * **Release**: the 21,841 synsets of the ImageNet fall-2011 release.
# * **Candidates**: release $\setminus\ \mathcal{Y}_0$. One ILSVRC class (*teddy bear*) is not in
#   the 2011 release, so there are 20,842 candidates (21,841 − 1,000 = 20,841 would need every
#   training class in the release); the "all" list distributed with the SynC code has 20,842
#   entries too, the size shown as published below.
#
# The papers grade difficulty by how far an unseen label lies from the training labels in
# the is-a hierarchy. For a candidate $c$ let $d(c)$ be its *tree distance* to the nearest
# training label: the fewest links on a path that climbs from $c$ to a common ancestor and
# descends to the training label (a parent or child is at distance 1, a sibling at 2).
# Paths that go down and then up again (through a shared child to a second parent) are not
# allowed: they do not express similarity.
#
# The test sets are then "2-hop" $=\{c: d(c) \le 1\}$, "3-hop" $=\{c: d(c) \le 2\}$ and
# "all" $=$ every candidate. Counting the papers' "hops" as edges would put siblings in the
# 2-hop set and give about four times the published size; counting them as nodes on the
# path (so $n$ hops $= n-1$ edges) reproduces the published 2-hop size to within one label.
# The derived 3-hop set comes out smaller than published, by about a quarter; why is not yet
# explained (all three statements are asserted under the tables below). To evaluate on
# exactly the published benchmark, pass the lists with `published_2hop_file`,
# `published_3hop_file` and `published_all_file` (the lists circulate with the SynC code,
# github.com/pujols/zero-shot-learning, file `ImageNet_w2v.zip`, as one JSON object with
# keys `2-hops`, `3-hops`, `all`; pass that file to each parameter, or one text list each).
#
# The **generalised** variants ("+1K") rank the 1,000 training labels as candidates too.

# %%
started = time.perf_counter()
label_sets = imagenet.build_label_sets(hierarchy, published_lists=published)
print(f"label sets built in {time.perf_counter() - started:.1f} s")

# %%
# NBVAL_CHECK_OUTPUT
print(f"{len(label_sets.training)} training labels, {len(label_sets.candidates):,} candidates")
sizes = label_sets.sizes().set_index("test set")
ours_vs_published = sizes["labels (ours)"] / sizes["labels (published)"]
assert abs(sizes.loc["2-hop", "labels (ours)"] - sizes.loc["2-hop", "labels (published)"]) <= 1, \
    "the text above says the 2-hop set has the published size to within one label"
assert "3-hop" in published or 0.65 <= ours_vs_published["3-hop"] < 0.85, \
    f"the text above says the derived 3-hop set is about a quarter smaller than published: {ours_vs_published['3-hop']:.2f}"
label_sets.sizes()

# %%
# NBVAL_CHECK_OUTPUT
counts = label_sets.distance_counts(max_distance=5)
siblings_too = counts.set_index("max distance (edges)").loc[2, "candidates"] / sizes.loc["2-hop", "labels (published)"]
assert 3.5 <= siblings_too <= 4.5, f"the text says counting hops as edges gives about 4x the published 2-hop size, not {siblings_too:.1f}x"
counts

# %% [markdown]
# ## 2 · The metrics
#
# **Flat hit@k.** The share of test images whose true label is among the $k$ best-ranked
# candidates.
#
# **Hierarchical precision@k** (DeViSE's appendix, used again by ConSE) also gives credit
# for near misses. The rule below is *our reading* of DeViSE's definition, which does not
# spell out how distances are measured in a DAG; section 7 shows the other reading's effect. For an image with true label $y$ and candidate set $C$, grow a set of
# acceptable labels in rings around $y$ until it holds at least $k$ candidates:
#
# $$
# S_k(y) = \{\, v \in C : d(y, v) \le R_k(y) \,\}, \qquad
# R_k(y) = \min\,\{\, R \ge 0 : |\{ v \in C : d(y, v) \le R \}| \ge k \,\},
# $$
#
# where $d$ is the tree distance of section 1 (climb to a common ancestor, then descend),
# and a whole ring is added at once, so $S_k$ may hold more than $k$ labels. Then
#
# $$ \mathrm{hp@}k = \frac{1}{k}\,\big|\,\mathrm{top}_k(x) \cap S_k(y)\,\big|, $$
#
# averaged over the images. Since $S_1(y) = \{y\}$, hp@1 equals hit@1 (asserted under the
# results in section 6). Below, the rings for one label: the acceptable set grows ring by ring
# (each $S_k$ contains the previous one), from the label alone to its parent and child, then
# to its siblings.

# %%
# NBVAL_CHECK_OUTPUT
example_label = "n02123597"  # Siamese cat, an ILSVRC class: shown over training + all candidates
names = wordnet.display_names(label_sets.training + label_sets.candidates)  # distinct: "king (chessman)"
everything = label_sets.test_set("all", generalised=True)
previous = {example_label}
for k in (1, 2, 5, 10):
    members = imagenet.correct_set_example(example_label, everything, k, hierarchy)
    assert previous <= set(members) and (k > 1 or members == [example_label]), "the text says S_k grows ring by ring"
    assert k != 2 or set(wordnet.hypernyms(example_label)) <= set(members), "the text says S_2 holds the parent"
    previous = set(members)
    print(f"S_{k}: {len(members):3d} labels, e.g. {', '.join(names[w] for w in members[:6])}")

# %% [markdown]
# ## 3 · Test images
#
# In the demo the unseen images are Tux Paint stamps. A stamp's file name becomes a WordNet
# synset through a reviewed table for the ambiguous names (``zsl_utils/tables/tuxpaint_wnids.csv``:
# *mouse* the rodent, not the computer mouse) and a unique WordNet lookup otherwise; stamps
# whose name denotes no ImageNet synset, and stamps of a training class, are left out. The
# **seen** images are the 1,000 ImageNet sample photos (one per training class, most likely
# from the training split: notebook 01, section 9): not zero-shot test images, but they serve
# the generalised rows and the supervised reference. In the full profile the images are read
# from folders named by WNID.

# %%
if mode == "demo":
    stamps = tuxpaint_by_wnid(load_stamps(Path(stamps_dir) if stamps_dir else None), wordnet)
    print(stamps["how"].value_counts().to_string())
    unseen_stamps = stamps[stamps["wnid"].notna() & ~stamps["seen"].astype(bool)][["path", "wnid", "name"]]
    sample = imagenet_sample_photos(imagenet_sample_dir or None)
    images = pd.concat([unseen_stamps, sample], ignore_index=True)
    images["seen"] = images["wnid"].isin(set(label_sets.training))
    dataset_id = "tuxpaint-unseen+imagenet-sample"
else:
    wanted = set(label_sets.test_sets["all"])
    parts = [image_folder_by_wnid(imagenet21k_root, wnids=wanted, max_per_class=max_images_per_class or None)]
    if ilsvrc2012_val_root:
        parts.append(image_folder_by_wnid(ilsvrc2012_val_root, wnids=label_sets.training,
                                          max_per_class=max_images_per_class or None))
    images = pd.concat(parts, ignore_index=True)
    images["seen"] = images["wnid"].isin(set(label_sets.training))
    dataset_id = f"imagenet21k+val-{max_images_per_class or 'all'}"
images["path"] = images["path"].astype(str)
print(f"{len(images)} images of {images['wnid'].nunique()} classes; "
      f"{int(images['seen'].sum())} seen, {int((~images['seen']).sum())} unseen")

# %%
# NBVAL_CHECK_OUTPUT
in_sets = pd.DataFrame({name: images["wnid"].isin(set(labels)) for name, labels in label_sets.test_sets.items()})
pd.DataFrame({"images": in_sets.sum(), "classes": [images.loc[in_sets[c], "wnid"].nunique() for c in in_sets]})

# %% [markdown]
# ## 4 · Classifier outputs, computed once
#
# `cached_outputs("probs", ...)` stores the softmax over all 1,000 outputs (ConSE(1000) needs them
# all) as float16 in shards of `shard_size` images. Each shard is written to a temporary
# file and renamed into place, so an interrupted run leaves no half-written shard and the
# next run computes only the missing ones. The cache is keyed by the classifier's
# fingerprint (architecture, weights, preprocessing) and the dataset's (relative paths and
# file sizes): pointing it at another model or image set is refused with a message rather
# than silently mixing outputs. Unreadable images are skipped and listed, never fatal.
#
# On a machine with several GPUs, set `extraction_processes` to their number: the same
# cache is then filled by that many processes launched with `torchrun` (each takes every
# N-th shard; `zsl_utils.scale.extract`, see `docs/DISTRIBUTED.md`), and the call below
# then only reads it. The cached numbers are
# the same either way (`tests/test_distributed.py` checks this).

# %%
classifier = load_classifier(classifier_name, weights=classifier_weights or None, device=torch_device)
the_cache = dict(kind="probs", items=images["path"].tolist(), model=classifier, dataset_id=dataset_id,
                 cache_root=outputs_dir, shard_size=shard_size, **image_settings)  # names the cache
started = time.perf_counter()
outputs = cached_outputs(**the_cache, processes=extraction_processes, batch_size=batch_size, num_workers=num_workers)
probs_cache = outputs.cache
print(f"{probs_cache} ready in {time.perf_counter() - started:.1f} s; {len(outputs.skipped)} unreadable images skipped")
outputs.skipped.head(10)

# %% [markdown]
# ## 5 · Label vectors
#
# As in notebook 01, a synset's vector is the mean of its lemmas' word vectors. Candidates
# that the word space cannot embed stay in the candidate list (they define the hp@k rings)
# but can never be predicted, so their images count as misses.

# %%
train_vectors = embed_labels(semantic_space, wnid_lemmas(classifier.wnids), device=device)
all_labels = list(dict.fromkeys(label_sets.training + label_sets.candidates))
label_vectors = embed_labels(semantic_space, wnid_lemmas(all_labels), device=device)
print("training labels:", train_vectors.report(max_names=5))
print("all labels:", label_vectors.report(max_names=5))
collisions = conse.label_collisions(label_vectors)
print(f"{sum(map(len, collisions)):,} labels share their vector with another ({len(collisions)} groups): ConSE ranks "
      "each group together, in label order (training labels first, then release order)")

# %% [markdown]
# ## 6 · Evaluation from the cache
#
# For every test set we evaluate the images whose label belongs to it, in the zero-shot
# setting and in the generalised (+1K) one, for each T. The outputs are streamed from the
# cache one shard at a time, so memory does not depend on the number of images. In the
# demo we add a fourth, small test set: the unseen stamp labels themselves.

# %%
tasks = imagenet.paper_tasks(label_sets, seen_images=True)
if mode == "demo":
    stamp_labels = sorted(set(images.loc[~images["seen"], "wnid"]))
    tasks.append(imagenet.EvalTask("stamp labels", stamp_labels, frozenset(stamp_labels)))
started = time.perf_counter()
result = imagenet.evaluate_conse(probs_cache, images["wnid"].tolist(), train_vectors, label_vectors, tasks,
                                 T_values=T_values, ks=ks, hierarchy=hierarchy, batch_size=eval_batch_size,
                                 device=torch_device, keep_top=5, unit_train=unit_label_vectors)
evaluation_seconds = time.perf_counter() - started
print(f"{len(tasks)} tasks x {len(T_values)} values of T evaluated in {evaluation_seconds:.1f} s")

# %%
# NBVAL_CHECK_OUTPUT
assert 1 not in ks or (result.table["hp@1"] - result.table["hit@1"]).abs().max() < 1e-9, \
    "section 2 says hp@1 equals hit@1"
result.table.round(1)

# %% [markdown]
# **Reading the table.** The lines printed below are computed from it:
#
# * **+1K and hit@1.** For ConSE(1), $f(x)$ is a training label's vector, itself a candidate in
#   the +1K rows, so an unseen image's first answer is always a training label and hit@1 is
#   exactly 0 (asserted).
# * **The hp@1 → hp@2 jump in +1K.** A 2-hop label lies one edge from a training label, and
#   that training label is usually in $S_2(y)$; when ConSE's first answer is that neighbour,
#   hp@2 gets half a point although hit@2 may get none. The share of such images is printed.
# * **Why the demo's 2-hop hit@1 is above the paper's.** The demo's unseen images are a few
#   dozen Tux Paint concepts, everyday words (their GloVe frequency rank is printed beside that
#   of all 2-hop labels), while the paper's images cover every 2-hop class; and candidates
#   without a vector can never be predicted, which removes some competitors (counted).

# %%
zero_shot_sets = [name for name in ("2-hop", "3-hop", "all") if name in label_sets.test_sets]
table = result.table.set_index(["test set", "model"])
if 1 in T_values:
    plus1k_hit1 = table.loc[[(f"{name} +1K", "ConSE(1)") for name in zero_shot_sets], "hit@1"]
    assert (plus1k_hit1 == 0).all(), "the text says ConSE(1) +1K has hit@1 = 0 on unseen images"
    print(f"ConSE(1) +1K hit@1 on {', '.join(zero_shot_sets)}: {', '.join(f'{v:.1f}' for v in plus1k_hit1)} %")
if 2 in ks and (("2-hop +1K", T_values[0]) in result.top_predictions):
    T0, task = T_values[0], "2-hop +1K"
    first = [result.candidates[task][ranked[0]] for ranked in result.top_predictions[(task, T0)]]
    truth = [images["wnid"][row] for row in result.rows[task]]
    in_s2 = [f in imagenet.correct_set_example(t, result.candidates[task], 2, hierarchy) for f, t in zip(first, truth)]
    print(f"{task}, ConSE({T0}): the first answer is in S_2(y) for {100 * sum(in_s2) / len(in_s2):.0f} % of the images "
          f"(hp@2 {table.loc[(task, f'ConSE({T0})'), 'hp@2']:.1f} against hp@1 {table.loc[(task, f'ConSE({T0})'), 'hp@1']:.1f})")
glove = load_word_vectors()
lemmas = wnid_lemmas(all_labels)
frequency_rank = {w: min(max(glove.key_to_index.get(t.lower(), len(glove.key_to_index)) for t in lemma.split("_"))
                         for lemma in lemmas[w]) for w in label_sets.test_sets["2-hop"]}
demo_two_hop = sorted(set(images["wnid"]) & set(label_sets.test_sets["2-hop"]))
two_hop = table.loc[("2-hop", f"ConSE({T_values[0]})")]
print(f"2-hop: {len(demo_two_hop)} classes with images, median GloVe frequency rank "
      f"{int(np.median([frequency_rank[w] for w in demo_two_hop])):,} against {int(np.median(list(frequency_rank.values()))):,} "
      f"over all {len(frequency_rank):,} 2-hop labels; {int(two_hop['unembedded candidates'])} of "
      f"{int(two_hop['candidates']):,} candidates have no vector and are never predicted")

# %% [markdown]
# Supervised reference on the seen images (the ImageNet sample photos): the plain softmax
# classifier over its 1,000 outputs. ConSE in the +1K setting must keep these images on their
# training label while thousands of unseen labels compete for them. ConSE(1) equals the
# softmax except where labels lack or share a vector (notebook 01, section 9, counts the
# cases on these very photos), so the two are close but need not be equal (printed). No
# unseen candidate can take ConSE(1)'s first place: $f(x)$ is a training label's vector, and
# equal vectors are listed training labels first, so its hit@1 is the same on every test set
# (asserted).

# %%
# NBVAL_CHECK_OUTPUT
reference = imagenet.classifier_hit_at_k(probs_cache, images["wnid"].tolist(), classifier.wnids, ks=(1, 5)).round(1)
reference

# %%
seen_rows = [f"{name} +1K, seen images" for name in zero_shot_sets]
if 1 in T_values:
    conse1 = table.loc[[(task, "ConSE(1)") for task in seen_rows], "hit@1"]
    print(f"seen images, hit@1: softmax {reference['hit@1']:.1f} %; ConSE(1) +1K {', '.join(f'{v:.1f}' for v in conse1)} % "
          f"on {', '.join(zero_shot_sets)}")
    assert conse1.nunique() == 1, "the text says no unseen candidate takes the first place from ConSE(1)'s training label"

# %% [markdown]
# ## 7 · Beside the paper
#
# The paper's rows (Table 1: flat hit@k; Table 2: hierarchical precision@k) sit above ours.
# The paper's values were entered from memory and none has yet been checked against a copy
# of the paper (``zsl_utils/tables/paper_conse_imagenet.csv`` records this); values not
# remembered are left empty rather than guessed. The paper's classifier was a
# 2012-era convolutional network and its word space a 500-d skip-gram model trained on
# Wikipedia; in the demo the "images" are a few hundred clip-art and photo stamps and the
# word space is 50-d GloVe, so at most orders of magnitude and trends can be compared. The
# lines printed under the two tables compute them: how far our ConSE(10) is from the
# paper's, whether hit@k falls from 2-hop to 3-hop to all, and where ConSE(10) beats
# ConSE(1) and ConSE(1000) (ours only: the paper's ConSE(1) and ConSE(1000) rows are empty).

# %%
# NBVAL_CHECK_OUTPUT
imagenet.with_paper_numbers(result.table, "hit", ks=ks).round(1)

# %%
# NBVAL_CHECK_OUTPUT
imagenet.with_paper_numbers(result.table, "hp", ks=ks).round(1)

# %%
hits = [f"hit@{k}" for k in ks]
beside = imagenet.with_paper_numbers(result.table, "hit", ks=ks).round(1)
zero_shot_sets = ["2-hop", "3-hop", "all"]
ours10, paper10 = (beside[(beside.source == source) & (beside.model == "ConSE(10)") & beside["test set"].isin(zero_shot_sets)]
                   .set_index("test set")[hits] for source in ("ours", "paper"))
ratio = (ours10 / paper10).stack()
if len(ratio):
    print(f"our ConSE(10) hit@k is {ratio.min():.1f} to {ratio.max():.1f} times the paper's on {', '.join(zero_shot_sets)}")
for source in ("ours", "paper"):
    rows = beside[(beside.source == source) & beside["test set"].isin(zero_shot_sets)].dropna(subset=hits)
    wide = rows.pivot(index="model", columns="test set", values=hits)
    falls = (wide.xs("2-hop", axis=1, level=1) >= wide.xs("3-hop", axis=1, level=1)) & \
            (wide.xs("3-hop", axis=1, level=1) >= wide.xs("all", axis=1, level=1))
    print(f"{source}: hit@k falls (or stays) from 2-hop to 3-hop to all for {int(falls.values.sum())} of {falls.size} (model, k) pairs")
scores = result.table.set_index(["test set", "model"])[hits + [f"hp@{k}" for k in ks]].round(1)  # as the tables show them
for better, worse in (("ConSE(10)", "ConSE(1)"), ("ConSE(10)", "ConSE(1000)")):
    if {better, worse} <= set(result.table.model):
        a, b = scores.xs(better, level="model"), scores.xs(worse, level="model")
        for metric in ("hit", "hp"):
            columns = [c for c in scores.columns if c.startswith(f"{metric}@")]
            lower = [f"{t} {c} ({a.loc[t, c]} vs {b.loc[t, c]})" for t in a.index for c in columns if a.loc[t, c] < b.loc[t, c]]
            print(f"{better} against {worse}, {metric}@k over {a[columns].size} (test set, k) pairs: higher in "
                  f"{int((a[columns] > b[columns]).values.sum())}, equal in {int((a[columns] == b[columns]).values.sum())}, "
                  f"lower in {len(lower)}{': ' + '; '.join(lower) if lower else ''}")

# %% [markdown]
# **The other reading of hp@k.** Section 2's distance only climbs to a common ancestor and
# descends; a path that goes down to a shared child and up to its other parent is not
# allowed. DeViSE's definition does not say which paths count, so here is the same
# evaluation of ConSE(10) on the zero-shot sets with any shortest path allowed
# (`Hierarchy.any_path()`), beside ours. hit@k does not depend on the reading; how far hp@k
# moves is printed.

# %%
alternative_T = 10 if 10 in T_values else T_values[0]
readings = {}
for reading, graph in (("climb then descend (ours)", hierarchy), ("any path", hierarchy.any_path())):
    run = imagenet.evaluate_conse(probs_cache, images["wnid"].tolist(), train_vectors, label_vectors,
                                  [t for t in tasks if t.name in zero_shot_sets], T_values=[alternative_T], ks=ks,
                                  hierarchy=graph, batch_size=eval_batch_size, device=torch_device, progress=False,
                                  unit_train=unit_label_vectors)
    readings[reading] = run.table.set_index("test set")[[f"hp@{k}" for k in ks]]
reading_table = pd.concat(readings, names=["reading"]).round(1)
change = (readings["any path"] - readings["climb then descend (ours)"]).round(1)
print(f"ConSE({alternative_T}): any-path hp@k minus ours ranges from {change.values.min():+.1f} to {change.values.max():+.1f} "
      f"points over {change.size} (test set, k) pairs; unchanged in {int((change == 0).values.sum())}")
reading_table

# %% [markdown]
# ## 8 · Figures
#
# The paper's ConSE(10) and DeViSE points (where entered) are drawn dashed with open markers;
# the panels share their y-axis.

# %%
zero_shot = result.table[~result.table["test set"].str.contains("seen images")]
paper_rows = {metric: imagenet.with_paper_numbers(result.table, metric, ks=ks).query("source == 'paper'")
              for metric in ("hit", "hp")}
fig = plots.plot_hit_at_k_curves(zero_shot, ks=ks, metric="hit", paper=paper_rows["hit"])
plots.save_figure(fig, "02_imagenet_hit_at_k_by_T")

# %%
fig = plots.plot_hit_at_k_curves(zero_shot, ks=ks, metric="hp", paper=paper_rows["hp"])
plots.save_figure(fig, "02_imagenet_hp_at_k_by_T")

# %% [markdown]
# Hits and misses of ConSE(10) on the largest test set, "all": each panel shows the image, its
# true label (green when it is among the top 5) and the five best candidates.

# %%
example_T = 10 if 10 in T_values else T_values[0]
examples = result.examples("all", example_T, images["wnid"].tolist(), n_hits=n_examples, n_misses=n_examples,
                           seed=seed)
fig = plots.plot_hits_and_misses(
    [load_image_rgb(images.loc[row, "path"]) for row in examples["row"]],
    [names[w] for w in examples["true"]],
    [[names[w] for w in predicted] for predicted in examples["predicted"]],
    examples["rank"].tolist(),
    title=f"ConSE({example_T}) on the 'all' test set: hits (green) and misses (red)",
)
plots.save_figure(fig, "02_imagenet_examples")

# %% [markdown]
# ## 9 · Rerunning is cheap
#
# Opening the cache again finds every shard present, so nothing is recomputed; the whole
# evaluation above reads only the cached probabilities. `benchmarks/bench_eval_from_cache.py`
# measures throughput and peak memory for 10^4 and 10^5 images over the 20,842 candidates.

# %%
started = time.perf_counter()
again = cached_outputs(**the_cache, progress=False).cache
assert again.missing_shards() == [], "the text says reopening the cache finds every shard present"
print(f"reopened the complete cache in {time.perf_counter() - started:.2f} s "
      f"({again.n_shards} shard(s), missing: {again.missing_shards()}); evaluation took {evaluation_seconds:.1f} s")

# %% [markdown]
# ## 10 · DeViSE beside ConSE
#
# The paper's main comparison is with DeViSE (Frome et al., NIPS 2013), which *learns* a
# linear map $M$ from the classifier's image features $v$ (here Lite0's 1,280-d pooled
# features, the layer under the softmax) into the word space, with a hinge rank loss that
# wants the true label's unit vector $s_y$ to score above every other training label's by a
# margin:
#
# $$ \ell(v, y) = \sum_{j \ne y} \max\big(0,\ \text{margin} - s_y^\top M v + s_j^\top M v\big). $$
#
# A candidate $u$ is scored by $s_u^\top M v$ (`zsl_utils.conse.devise`). ConSE trains
# nothing; DeViSE needs training images of the 1,000 classes. The full profile uses
# ILSVRC-2012's train split (`ilsvrc2012_train_root`, 1.2 M images, as DeViSE did); **the demo
# has one photo per class**, the ImageNet sample, seen in `devise_views` fixed views (original,
# mirror image, central crop, ...): about a thousandth of DeViSE's data, so the demo shows how
# the comparison is run, not how DeViSE fares when trained as in its paper. DeViSE is trained
# once per seed in `devise_seeds` and evaluated on the same tasks, candidates and metrics as
# ConSE; its rows are mean ± sd over the seeds. (The demo's sample photos are also its seen
# test images, so the "seen images" rows are training images for DeViSE and are left out.)

# %%
if ilsvrc2012_train_root:
    train_images = image_folder_by_wnid(ilsvrc2012_train_root, wnids=label_sets.training,
                                        max_per_class=max_train_images_per_class or None)
else:
    train_images = augmented_views(imagenet_sample_photos(imagenet_sample_dir or None),
                                   config.CACHE_DIR / "imagenet_sample_views", devise_views)
train_features = cached_outputs("image_features", train_images["path"].astype(str).tolist(), classifier,
                                dataset_id=f"devise-train-{'ilsvrc2012' if ilsvrc2012_train_root else 'imagenet-sample'}",
                                cache_root=outputs_dir, shard_size=shard_size, **image_settings,
                                processes=extraction_processes, batch_size=batch_size, num_workers=num_workers)
test_features = cached_outputs("image_features", images["path"].tolist(), classifier, dataset_id=dataset_id,
                               cache_root=outputs_dir, shard_size=shard_size, **image_settings,
                               processes=extraction_processes, batch_size=batch_size, num_workers=num_workers)
train_ok = train_features.ok
print(f"DeViSE training set: {int(train_ok.sum()):,} images of {train_images['wnid'][train_ok].nunique()} classes; "
      f"test features for {len(images):,} images")

# %%
devise_tasks = [t for t in tasks if "seen images" not in t.name and t.name != "stamp labels"]
per_seed, histories = [], {}
for devise_seed in devise_seeds:
    settings = devise.DeViSEConfig(margin=devise_margin, learning_rate=devise_learning_rate, num_steps=devise_steps,
                                   batch_size=devise_batch_size, seed=devise_seed, compute_dtype=compute_dtype)
    trained, histories[devise_seed] = devise.train_devise(
        train_features.load()[train_ok], train_images["wnid"][train_ok].tolist(), train_vectors, settings,
        device=torch_device, checkpoint_dir=config.CACHE_DIR / "devise_checkpoints",
        checkpoint_every=max(1, devise_steps // 4), progress=False)
    run = imagenet.evaluate_conse(test_features.cache, images["wnid"].tolist(), train_vectors, label_vectors,
                                  devise_tasks, ks=ks, hierarchy=hierarchy, batch_size=eval_batch_size,
                                  device=torch_device, progress=False, embedders={"DeViSE": trained.embed},
                                  source_key="features")
    per_seed.append(run.table.set_index("test set"))
metric_columns = [f"{m}@{k}" for m in ("hit", "hp") for k in ks]
devise_spread = {task.name: seed_spread([seed_table.loc[task.name, metric_columns] for seed_table in per_seed])
                 for task in devise_tasks}
loss_start = pd.Series({s: h.loss.iloc[:50].mean() for s, h in histories.items()})
loss_end = pd.Series({s: h.loss.iloc[-50:].mean() for s, h in histories.items()})
over_training_labels = conse.ConSE.from_embeddings(train_vectors, train_vectors, T=1, device=torch_device)
fitted = over_training_labels.predict_embedded(*trained.embed(train_features.load()[train_ok]), k=1)
train_hit1 = 100 * float(np.mean([fitted.labels(i)[0] == w for i, w in enumerate(train_images["wnid"][train_ok])]))
print(f"DeViSE rank loss, mean over seeds: {loss_start.mean():.2f} over the first 50 steps, {loss_end.mean():.2f} "
      f"over the last 50; the last seed puts {train_hit1:.1f} % of its training images first in their own class")
assert ilsvrc2012_train_root or (loss_end.mean() < 0.1 * loss_start.mean() and train_hit1 > 90), \
    "the text below says the demo's DeViSE fits its training photos (loss near zero, almost all placed right)"

# %%
# NBVAL_CHECK_OUTPUT
rows = []
for task in devise_tasks:
    rows.append({"test set": task.name, "model": f"DeViSE ({len(devise_seeds)} seeds)",
                 **mean_sd_text(devise_spread[task.name]).to_dict()})
    for T in T_values:
        conse_row = table.loc[(task.name, f"ConSE({T})"), metric_columns]
        rows.append({"test set": task.name, "model": f"ConSE({T})", **conse_row.round(1).astype(str).to_dict()})
paper_devise = imagenet.with_paper_numbers(result.table, "hit", ks=ks).query("source == 'paper' and model == 'DeViSE'")
for _, paper_row in paper_devise.dropna(subset=[f"hit@{k}" for k in ks], how="all").iterrows():
    rows.append({"test set": paper_row["test set"], "model": "DeViSE (paper)",
                 **{f"hit@{k}": f"{paper_row[f'hit@{k}']:.1f}" for k in ks}})
pd.DataFrame(rows).fillna("")

# %%
reference_T = 10 if 10 in T_values else T_values[0]
for task in devise_tasks:
    conse_spread = pd.DataFrame({"mean": table.loc[(task.name, f"ConSE({reference_T})"), metric_columns], "sd": 0.0})
    higher, lower, within = difference_counts(devise_spread[task.name], conse_spread)
    print(f"{task.name}: DeViSE against ConSE({reference_T}) over {len(metric_columns)} hit@k/hp@k: clearly higher in "
          f"{higher}, clearly lower in {lower}, within DeViSE's spread over seeds in {within}")
paper = imagenet.with_paper_numbers(result.table, "hit", ks=ks).query("source == 'paper'").set_index(["test set", "model"])
paper_pairs = [(t, k) for t in zero_shot_sets for k in ks
               if (t, "DeViSE") in paper.index and (t, "ConSE(10)") in paper.index
               and pd.notna(paper.loc[(t, "DeViSE"), f"hit@{k}"]) and pd.notna(paper.loc[(t, "ConSE(10)"), f"hit@{k}"])]
paper_wins = sum(paper.loc[(t, "ConSE(10)"), f"hit@{k}"] > paper.loc[(t, "DeViSE"), f"hit@{k}"] for t, k in paper_pairs)
print(f"the paper: ConSE(10) above DeViSE in {paper_wins} of the {len(paper_pairs)} (test set, hit@k) pairs it reports")

# %% [markdown]
# The lines above are the reading: where DeViSE, trained here on one photo per class, lands
# against ConSE with no training at all, counted with DeViSE's spread over seeds (a
# difference counts only when ConSE's value lies outside DeViSE's mean ± sd), and what the
# paper reports for the same comparison with DeViSE trained on all of ILSVRC-2012. The
# training line under the DeViSE cell says why the demo's DeViSE is weak: its rank loss
# reaches (nearly) zero and it places almost all of its training views in their own class,
# i.e. it fits the 1,000 photos rather than learning a map that carries over to new classes;
# with one photo per class that is what to expect, and the full profile is the real test.

# %% [markdown]
# ## Summary
#
# * The test sets follow from one documented rule on WordNet 3.0; the derived 2-hop set
#   matches the published size to within one label, the 3-hop set is about a quarter smaller
#   than published (not yet explained; both asserted in section 1), and published lists (text
#   or the JSON that circulates with the SynC code) can replace all three.
# * How ConSE(10) compares with ConSE(1) depends on the test set and $k$: the lines printed in
#   section 7 count where it is higher, equal and lower. In the +1K rows ConSE(1) never puts
#   an unseen label first (hit@1 = 0, asserted in section 6).
# * hit@k follows the DeViSE definition; hp@k follows our reading of it (climb then descend),
#   written out in section 2 and tested on hand-built trees (`tests/test_metrics.py`); section 7
#   prints how far the other reading (any path) moves it.
# * Classifier outputs are cached once per (model, weights, preprocessing, dataset), in
#   atomic shards that survive interrupts; ConSE(1/10/1000) and the +1K variants are then
#   evaluated from the cache without running the classifier again (section 9 prints how long
#   the evaluation took).
# * DeViSE (section 10) is trained on the same classifier's features and evaluated on the
#   same tasks; in the demo it sees one photo per class, so its rows show the protocol rather
#   than DeViSE's strength; the lines printed there count where it is above or below ConSE.
#
# ## Try it
#
# 1. **The published lists.** With the SynC code's `ImageNet_w2v.zip` unpacked, pass its JSON
#    to `published_2hop_file`, `published_3hop_file` and `published_all_file`: how do the
#    sizes and the demo's numbers change?
# 2. **Unit vectors.** `unit_label_vectors=True`: which test sets gain, which lose?
# 3. **Another semantic space.** `semantic_space=minilm`: fewer candidates without a vector;
#    does 2-hop hit@k rise?
# 4. **Your own test set**, below: any list of WNIDs becomes a task over any candidates.

# %%
my_labels = [w for w in label_sets.test_sets["2-hop"] if w in set(images["wnid"])][:10]  # any WNIDs with images
my_task = imagenet.EvalTask("my labels", my_labels, frozenset(my_labels))
mine = imagenet.evaluate_conse(probs_cache, images["wnid"].tolist(), train_vectors, label_vectors, [my_task],
                               T_values=[1, 10], ks=[1, 5], hierarchy=hierarchy, device=torch_device, progress=False)
print("labels:", ", ".join(names[w] for w in my_labels))
mine.table.round(1)
