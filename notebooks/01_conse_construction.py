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
# # 01 · ConSE: a zero-shot model built from a classifier and a word space
#
# A softmax classifier trained on ImageNet's 1,000 classes can only ever answer with one of
# those 1,000 labels. Show it a giraffe (not one of the 1,000) and it will say *gazelle*,
# *llama* or *ostrich*, each with some probability. **ConSE** (Norouzi et al., *Zero-shot
# learning by convex combination of semantic embeddings*, ICLR 2014) turns those hesitant
# guesses into an answer about labels the classifier has never seen, **without any training**.
#
# This notebook builds ConSE step by step from two ready-made parts, the EfficientNet-Lite0
# ImageNet classifier and 50-d GloVe word vectors, and tries it on real photos from the
# Tux Paint stamp collection whose concepts lie outside the 1,000 training classes. The
# sanity check at the end runs on 1,000 real ImageNet photos, one per training class.
# The paper: [arXiv:1312.5650](https://arxiv.org/abs/1312.5650); each section below names
# the part of the paper it follows.

# %% tags=["parameters"]
profile_name: str = "demo"  # parameter profile that launched this run (set by the runner)
seed: int = 0  # random seed
device: str = "auto"  # compute device (one of: "auto", "cpu", "cuda", "cuda:*", "mps")
classifier_name: str = "efficientnet_lite0"  # classifier: efficientnet_lite0, timm:<arch> or torchvision:<arch>
classifier_weights: str = ""  # optional local checkpoint for the classifier; empty means its default weights
semantic_space: str = "glove-6b-50d"  # label embeddings: "glove-6b-50d", "minilm" (sentence encoder) or a word-vector file
conse_T: int = 10  # how many top training labels ConSE combines (the paper tries 1, 10 and 1000) (at least 1)
T_values: list[int] = [1, 2, 5, 10, 100, 1000]  # values of T compared in section 6 (at least 1) (non-empty)
top_k: int = 5  # unseen labels listed per image (at least 1)
example_stamps: list[str] = ["giraffe", "penguin", "elephant", "capybara", "kangaroo", "owl", "seahorse"]  # Tux Paint stamps shown
stamps_dir: str = ""  # Tux Paint stamps folder; empty means the copy fetched into data/raw
batch_size: int = 32  # images per classifier forward pass (at least 1)
extraction_processes: int = 1  # processes filling the cache (1: this notebook; N: torchrun on this machine) (at least 1)
compute_dtype: str = "float64"  # precision of the forward pass; float64 stores the same numbers on every CPU (one of: "float32", "float64")
unit_label_vectors: bool = False  # unit-normalise the training-label vectors before combining them (section 7 shows both)
imagenet_sample_dir: str = ""  # ImageNet sample photos <wnid>_<name>.JPEG (one per class); empty: $ZSL_IMAGENET_SAMPLE or a fetched copy


# %%
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import spearmanr

from zsl_utils import plots
from zsl_utils.conse import model as conse
from zsl_utils.classifiers import load_classifier
from zsl_utils.data.images import imagenet_sample_photos, load_image_rgb
from zsl_utils.classifiers import PUBLISHED_TOP1
from zsl_utils.data.wnids import imagenet_wnids, wnid_lemmas
from zsl_utils.device import pick_device, seed_everything
from zsl_utils.errors import ParameterError
from zsl_utils.extract import cached_outputs
from zsl_utils.semantic import embed_labels, load_word_vectors
from zsl_utils.data.tuxpaint import filter_stamps, load_stamps, tuxpaint_by_wnid
from zsl_utils.data.wordnet import WordNet
from zsl_utils.parameters import check_parameter_types

check_parameter_types(globals())  # a value of the wrong type (papermill -p x abc) is named here
seed_everything(seed)
torch_device = pick_device(device)
stamps = load_stamps(Path(stamps_dir) if stamps_dir else None)
wordnet = WordNet.load()
ANIMAL = "n00015388"  # WordNet's 'animal' synset: the demo's unseen photos are animals
# One distinct readable name per label over the whole label space: "king (chessman)", not "king" three times.
names = wordnet.display_names(imagenet_wnids("1k") + imagenet_wnids("21k"))
print(f"device={torch_device}, {len(stamps)} Tux Paint stamps, {sum(1 for _ in wordnet.wnids()):,} WordNet noun synsets")


# %% [markdown]
# ## 1 · The idea in one formula
#
# *(Paper: the section that defines ConSE, its equation for $f(x)$.)*
#
# Write $p(y \mid x)$ for the classifier's softmax probability of training label $y$ given
# image $x$, and $s(y) \in \mathbb{R}^d$ for a vector that places the *word* $y$ in a semantic
# space, where related words lie close together. Sort the training labels by probability,
# $\hat y_1, \hat y_2, \dots$, and keep the first $T$. ConSE maps the image into the word
# space as the probability-weighted average of those labels' vectors:
#
# $$
# f(x) \;=\; \frac{1}{Z}\sum_{t=1}^{T} p(\hat y_t \mid x)\; s(\hat y_t),
# \qquad Z \;=\; \sum_{t=1}^{T} p(\hat y_t \mid x).
# $$
#
# Dividing by $Z$ makes the weights sum to one, so $f(x)$ is a *convex combination*: it
# lies inside the region spanned by the $T$ label vectors. An image the classifier finds
# halfway between *gazelle* and *llama* lands between those two words, which is where a
# word like *giraffe* may also live.
#
# To name the image we compare $f(x)$ with the vector $s(u)$ of every **candidate** label
# $u$ by cosine similarity and return the most similar ones. The candidates can be any
# labels with a vector:
#
# * **zero-shot** (ZSL): only labels the classifier was never trained on;
# * **generalised**: training and unseen labels together (the paper's "+1K" rows).
#
# Nothing is learned: the classifier and the word vectors are used as they are.

# %% [markdown]
# ## 2 · The components
#
# **The classifier.** `load_classifier()` returns the model, its exact preprocessing, the
# WordNet id (WNID) of each of its 1,000 outputs, and a fingerprint used as a cache key.

# %%
classifier = load_classifier(classifier_name, weights=classifier_weights or None, device=torch_device)
print(classifier.name, "-", len(classifier.wnids), "outputs; first three:",
      [f"{w} ({names[w]})" for w in classifier.wnids[:3]])
print("preprocessing:", classifier.preprocess.config)

# %% [markdown]
# **The semantic space.** GloVe places 400,000 words in 50 dimensions so that words used in
# similar contexts get similar vectors. The classic check: *king − man + woman* should be
# close to *queen*. (The parameter `semantic_space` can swap GloVe for another word-vector
# file or for the MiniLM sentence encoder; this illustration always uses GloVe.)

# %%
word_space = load_word_vectors()
print(f"{len(word_space.index_to_key):,} words, {word_space.vector_size} dimensions")
analogy = word_space.most_similar(positive=["king", "woman"], negative=["man"], topn=3)
assert (len(word_space.index_to_key), word_space.vector_size) == (400_000, 50), "the text says 400,000 words in 50-d"
assert analogy[0][0] == "queen", f"the text says king - man + woman is close to queen; nearest: {analogy}"
analogy

# %% [markdown]
# **Label vectors.** A label here is a WordNet synset, which usually has several synonyms
# (lemmas): *tabby* and *tabby cat*. Following the paper, a label's vector is the mean of its
# lemmas' vectors. A lemma of several words is looked up as a phrase token first (GloVe has
# none, word2vec has many) and otherwise averaged over its words. Labels none of whose
# lemmas are in the vocabulary are *missing*; they are listed, never given a zero vector in
# secret. For the 1,000 training labels, a missing label simply cannot take part in $f(x)$.

# %%
# NBVAL_CHECK_OUTPUT
train = embed_labels(semantic_space, wnid_lemmas(classifier.wnids), device=device)
unseen_wnids = [w for w in imagenet_wnids("21k") if w not in set(classifier.wnids)]
unseen_all = embed_labels(semantic_space, wnid_lemmas(unseen_wnids), device=device)
unseen = unseen_all.only_found()
print("training labels:", train.report(max_names=13))
print("unseen ImageNet-21K labels:", unseen_all.report(max_names=8))
print(f"zero-shot candidate set: {len(unseen):,} embedded unseen labels")
not_in_release = sorted(set(classifier.wnids) - set(imagenet_wnids("21k")))
assert [names[w] for w in not_in_release] == ["teddy"] and len(unseen_wnids) == 20_842, \
    f"the text below says only teddy bear is outside the 2011 release, leaving 20,842: {not_in_release}"

# %% [markdown]
# The unseen candidates are the synsets of the ImageNet fall-2011 release (21,841 classes,
# the paper's label space) minus the training classes. One training class, *teddy bear*, is
# not part of that release, so 20,842 labels remain (21,841 − 1,000 would be 20,841; the
# "all" list distributed with later benchmarks has 20,842 too); the ones
# the word space cannot embed (rare words, Latin names, compound words: the report above
# names the first few) are dropped from the candidates and would count as misses in an
# evaluation.
#
# **Labels that share a vector.** Synsets with the same lemmas get the same vector: WordNet
# has a *king* that rules, one on the chessboard and one in a deck of cards, all just "king".
# ConSE cannot tell such candidates apart; they tie exactly. The library ranks each group of
# identical vectors together and lists its members in candidate (release) order, so the
# order is the same on every machine (`conse.model.vector_groups`). Every label is printed
# with a disambiguator where its first lemma is shared (the hypernym's lemma, else a synonym
# or the gloss's first words: `WordNet.display_names`). How many candidates collide:
#
# %%
collisions = conse.label_collisions(unseen)
print(f"{sum(map(len, collisions)):,} of {len(unseen):,} candidates share their vector with another candidate "
      f"({len(collisions)} groups, the largest of {max(map(len, collisions))}); e.g. "
      + "; ".join(" = ".join(names[w] for w in group) for group in collisions[:3]))
assert len(set(names.values())) == len(names), "the text says every printed label name is distinct"

# %% [markdown]
# ## 3 · The photos and the classifier's probabilities
#
# The Tux Paint stamps include cut-out photos of animals. A stamp's file name becomes a
# WordNet synset through the same reviewed mapping notebook 02 uses
# (`zsl_utils.data.tuxpaint.tuxpaint_by_wnid`): a committed table decides the names whose
# WordNet senses are ambiguous, e.g. *seahorse*, whose first sense is the walrus, or
# *hedgehog*, first the porcupine, and any other name takes its only sense among the
# training and candidate labels. `filter_stamps` then keeps the photos (Tux Paint
# stores drawings in `cartoon/` folders) whose synset is an animal; a photo is *unseen* when
# its synset is not a training class but is among the candidates. Softmax outputs for every
# stamp are computed once and cached on disk (`zsl_utils.extract.cached_outputs`);
# everything below works on that probability matrix. With `extraction_processes` > 1 the
# cache is filled by that many processes (`torchrun`, one per GPU when there are GPUs).

# %%
stamp_labels = tuxpaint_by_wnid(stamps, wordnet, label_space=set(classifier.wnids) | set(unseen_wnids),
                                seen_wnids=classifier.wnids)
animals = filter_stamps(stamp_labels, top_categories=("animals",), under=ANIMAL, wordnet=wordnet)
candidate_set = set(unseen.labels)
unseen_photos = animals[animals.wnid.isin(candidate_set)].reset_index(drop=True)
stamp_paths = [str(p) for p in stamps.path]
outputs = cached_outputs("probs", stamp_paths, classifier, dataset_id="tuxpaint_stamps", processes=extraction_processes,
                         batch_size=batch_size, dtype="float32", compute_dtype=compute_dtype, progress=False)
probs_all, ok = outputs.load(), outputs.ok
row_of = {str(path): row for row, path in enumerate(stamps.path)}
print(f"{len(animals)} animal photos, {len(unseen_photos)} of them unseen; {int((~ok).sum())} unreadable stamps")

# %%
missing_examples = sorted(set(example_stamps) - set(unseen_photos.name))
if missing_examples:
    raise ParameterError(
        f"example_stamps {missing_examples} are not unseen animal photos here; choose from "
        f"{sorted(unseen_photos.name)}."
    )
examples = unseen_photos.set_index("name").loc[list(example_stamps)].reset_index()
example_probs = probs_all[[row_of[str(p)] for p in examples.path]]
unseen_probs = probs_all[[row_of[str(p)] for p in unseen_photos.path]]
examples[["name", "wnid", "description"]]

# %% [markdown]
# ## 4 · ConSE step by step, on one photo
#
# *(Paper: the ConSE section, the top-$T$ average and the cosine ranking.)*
#
# Take the first example. The classifier spreads its probability over a few training
# labels, none of which is right, because the right one is not among them. ConSE uses the
# $T$ most probable labels *that have a vector*; a label GloVe cannot embed (a rare breed
# name, say) is skipped and the next one moves up.

# %%
first = examples.iloc[0]
top = conse.top_training_labels(example_probs[0], classifier.wnids, n=conse_T, mask=train.found)
z = sum(p for _, p in top)
pd.DataFrame({"training label": [names[w] for w, _ in top], "p(y|x)": [p for _, p in top],
              "weight p/Z": [p / z for _, p in top]}).round(4)

# %% [markdown]
# The weights $p/Z$ multiply the label vectors; their sum is $f(x)$. Its length
# $\lVert f(x) \rVert$ is at most the weighted mean length of those label vectors, and below it
# when the top labels point in different directions (both are printed below). Ranking the 20-thousand-odd unseen candidates by cosine to
# $f(x)$ then gives ConSE's answer. We check the library's embedding against the formula
# computed by hand from the table above.

# %%
model = conse.ConSE.from_embeddings(train, unseen, T=conse_T, device=torch_device, unit_train=unit_label_vectors)
f_x, norm = model.embed(example_probs[:1])
label_vectors = train.vectors / (np.linalg.norm(train.vectors, axis=1, keepdims=True) if unit_label_vectors else 1)
by_hand = sum(p * label_vectors[classifier.wnids.index(w)] for w, p in top) / z
mean_length = sum(p / z * np.linalg.norm(label_vectors[classifier.wnids.index(w)]) for w, p in top)
print(f"true label: {first['name']} ({first.wnid}); ||f(x)|| = {norm[0]:.3f} against a weighted mean "
      f"||s(y)|| of {mean_length:.3f}; max |library - by hand| = {np.abs(f_x[0] - by_hand).max():.2e}")
assert np.allclose(f_x[0], by_hand, atol=1e-5), "the text says the library computes the formula above"
prediction = model.predict(example_probs[:1], k=top_k)
[(names[w], round(float(s), 3)) for w, s in zip(prediction.labels(0), prediction.scores[0])]

# %% [markdown]
# ## 5 · The unseen example photos
#
# For each photo: the classifier's three most probable training labels and ConSE's top
# unseen labels. The true label is in the title and marked `>` where ConSE lists it.

# %%
predictions = model.predict(example_probs, k=top_k)
images = [load_image_rgb(p) for p in examples.path]
titles = [f"{row['name']}  (true: {names[row.wnid]})" for _, row in examples.iterrows()]
train_tops = [[(names[w], p) for w, p in conse.top_training_labels(example_probs[i], classifier.wnids, 3)]
              for i in range(len(examples))]
conse_tops = [list(zip((names[w] for w in predictions.labels(i)), predictions.scores[i]))
              for i in range(len(examples))]
missed = [i for i, wnid in enumerate(examples.wnid) if predictions.labels(i)[0] != wnid]
animal_answers = [i for i in missed if ANIMAL in wordnet.ancestors(predictions.labels(i)[0])]
print(f"ConSE(T={conse_T})'s first answer misses the true label for {len(missed)} of {len(examples)} examples; "
      f"for {len(animal_answers)} of these it is still an animal "
      f"({', '.join(examples.name[i] + ' -> ' + names[predictions.labels(i)[0]] for i in animal_answers)})")
answers = dict(zip(examples.name, ({name for name, _ in labels} for labels in conse_tops)))
firsts = dict(zip(examples.name, (labels[0][0] for labels in train_tops)))
kings = {name for name in answers.get("penguin", ()) if name.startswith("king (")}
assert "owl" not in answers or (firsts["owl"] == "kite" and {"kite balloon", "sport kite"} <= answers["owl"]), \
    "the text below says the classifier's first label for the owl is kite and ConSE answers kite balloon, sport kite"
assert "penguin" not in answers or (firsts["penguin"] == "king penguin" and len(kings) >= 2), \
    "the text below says several synsets named king enter the penguin's top labels"
fig = plots.plot_conse_examples(images, titles, train_tops, conse_tops, conse_label=f"ConSE(T={conse_T})",
                                true_names=[names[w] for w in examples.wnid])
plots.save_figure(fig, "01_conse_unseen_examples")

# %% [markdown]
# Reading the failures is instructive:
#
# * **Polysemy.** A word vector mixes all senses of a word. For the owl the classifier says
#   *kite* (the bird of prey), and ConSE answers *kite balloon* and *sport kite*, the toy's
#   sense of the word.
# * **Phrase averaging.** Without phrase tokens, *king penguin* is the mean of *king* and
#   *penguin*, so for the penguin, whose first training label is *king penguin*, several
#   unseen synsets named *king* (the chess piece, the playing card, ...) enter ConSE's top
#   labels. They share one vector and tie; they are listed in release order.
# * **Near misses.** A wrong first answer can still be a related concept, which is what
#   hierarchical precision (notebook 02) rewards; the line printed above the figure counts
#   the misses whose first answer is still an animal.
#
# The labels come from file names through the reviewed mapping (so the seahorse is scored
# as the fish, not as WordNet's first sense, the walrus), and there are only a few dozen
# photos, so the scores below are a rough, small-sample picture.
#
# ## 6 · How T changes the answer
#
# With $T=1$, $f(x)$ is just the vector of the single most probable training label, so ConSE
# answers with the unseen word closest to that label's word, whatever the rest of the
# distribution says. Larger $T$ lets the runners-up pull $f(x)$ towards a compromise; very
# large $T$ adds hundreds of labels with tiny probabilities. Which $T$ does best is measured,
# not assumed: the table shows the top-1 unseen label of each example for every $T$; the
# second table and the figure score all unseen animal photos (flat hit@k: the true label
# among the first $k$), and the lines printed under it say which $T$ wins at each $k$.

# %%
by_T = conse.predictions_by_T(model, example_probs, T_values, k=1)
top1_table = conse.top1_by_T(by_T, examples.name, names)
print(f"the top-1 label changes with T for {int((top1_table.nunique(axis=1) > 1).sum())} of {len(top1_table)} examples")
top1_table

# %%
# NBVAL_CHECK_OUTPUT
all_by_T = conse.predictions_by_T(model, unseen_probs, T_values, k=10)
hits_by_T = conse.hit_at_k_by_T(all_by_T, list(unseen_photos.wnid))
print(f"{len(unseen_photos)} unseen animal photos, {len(unseen):,} candidate labels")
hits_by_T.round(1)

# %%
n_photos = len(unseen_photos)
for column in hits_by_T.columns:
    best = hits_by_T.index[hits_by_T[column] == hits_by_T[column].max()].tolist()
    gap = round((hits_by_T[column].max() - hits_by_T[column].min()) * n_photos / 100)
    print(f"{column}: best T = {', '.join(map(str, best))} ({hits_by_T[column].max():.1f} %); "
          f"best and worst T differ by {gap} of {n_photos} photos")
if {1, conse_T} <= set(hits_by_T.index) and conse_T != 1:
    diff = hits_by_T.loc[conse_T] - hits_by_T.loc[1]
    print(f"T={conse_T} against T=1: higher at {', '.join(diff.index[diff > 0]) or 'no k'}; "
          f"lower at {', '.join(diff.index[diff < 0]) or 'no k'}; equal at {', '.join(diff.index[diff == 0]) or 'no k'}")
largest_gap = round((hits_by_T.max() - hits_by_T.min()).max() * n_photos / 100)
assert largest_gap <= 5, f"the summary says the differences between T values are a handful of photos, not {largest_gap}"
assert hits_by_T["hit@1 %"].max() < 10 and hits_by_T["hit@10 %"].max() < 50, \
    "the summary says the right animal is rarely ConSE's first answer and is in its top 10 for a minority of photos"

# %%
fig = plots.plot_hit_vs_T(hits_by_T, title=f"ConSE zero-shot on {len(unseen_photos)} unseen Tux Paint photos")
plots.save_figure(fig, "01_conse_hit_vs_T")

# %% [markdown]
# **Generalised setting** *(paper: the "+1K" rows of its ImageNet tables)*. When the 1,000
# training labels are candidates too, an image's $f(x)$ lies closest to the training labels
# it was built from, so ConSE tends to answer with a training label. For $T=1$ it always
# does: $f(x)$ *is* one training label's vector, a candidate at cosine 1, so the hit@1 of an
# unseen photo is exactly 0 (an unseen candidate with the very same vector ties, and ties
# are listed in candidate order, training labels first). Both statements are asserted below.

# %%
generalised = conse.ConSE.from_embeddings(train, conse.generalised_candidates(train, unseen), T=conse_T,
                                          device=torch_device, unit_train=unit_label_vectors)
general_by_T = conse.predictions_by_T(generalised, unseen_probs, sorted({1, conse_T}), k=10)
train_set = set(classifier.wnids)
share_train = {T: np.mean([p.labels(i)[0] in train_set for i in range(len(unseen_photos))])
               for T, p in general_by_T.items()}
general_hits = conse.hit_at_k_by_T(general_by_T, list(unseen_photos.wnid))
print("; ".join(f"T={T}: top-1 is a training label for {100 * v:.0f} % of the unseen photos" for T, v in share_train.items()))
assert share_train[conse_T] > 0.5, "the text above says ConSE then tends to answer with a training label"
assert share_train[1] == 1.0 and general_hits.loc[1, "hit@1 %"] == 0, "the text above says ConSE(1) +1K always answers a training label"
general_hits.round(1)

# %% [markdown]
# ## 7 · The length of f(x) as a confidence signal
#
# If the top labels agree semantically (all cats), their vectors point the same way and
# their average is long; if they disagree (a cat, a teapot and a canoe), the average is
# short. So $\lVert f(x) \rVert$ behaves like a confidence. We compare it, over every readable
# stamp, with two confidences of the classifier itself: the largest probability and the
# entropy of the distribution.

# %%
probs_ok = probs_all[ok]
_, norms = model.embed(probs_ok)
confidence = conse.classifier_confidence(probs_ok)
correlations = {column: spearmanr(norms, confidence[column]).statistic for column in confidence.columns}
print({k: round(float(v), 3) for k, v in correlations.items()})
assert correlations["max_prob"] > 0 > correlations["entropy"], \
    "the text says ||f(x)|| rises with the largest probability and falls with the entropy"
fig = plots.plot_norm_vs_confidence(norms, confidence, correlations)
plots.save_figure(fig, "01_conse_norm_vs_confidence")

# %% [markdown]
# ## 8 · Raw or unit-length label vectors
#
# GloVe's vectors are not of unit length (the range is printed below), and the formula of
# section 1 averages them as they are. Each label then counts in $f(x)$ with its probability
# *times its vector's length*, so a long vector pulls harder, and $\lVert f(x) \rVert$ mixes
# two things: how much the top labels agree, and how long their vectors are. Normalising the
# label vectors first (`unit_label_vectors=True`) removes the second part. The paper writes
# the formula with $s(y)$ as given; we did not find it saying whether the vectors were
# normalised first (not checked against a copy of the paper), so the default is the formula as
# written, and the table compares both: zero-shot hit@k of ConSE(T) on the unseen photos, and
# the rank correlation of $\lVert f(x) \rVert$ with the classifier's confidences and with the
# weighted mean length of the combined label vectors, $\sum_t \frac{p_t}{Z}\lVert s(\hat y_t)\rVert$.

# %%
lengths = np.linalg.norm(train.vectors[train.found], axis=1)
print(f"training-label vector lengths: {lengths.min():.2f} to {lengths.max():.2f} (median {np.median(lengths):.2f})")
weighted_length = conse.conse_embed(probs_ok, np.linalg.norm(train.vectors, axis=1, keepdims=True), T=conse_T,
                                    train_mask=train.found)[0][:, 0]  # f(x) of the lengths: their weighted mean
by_setting = {}
for unit in (False, True):
    variant = conse.ConSE.from_embeddings(train, unseen, T=conse_T, device=torch_device, unit_train=unit)
    hits = conse.hit_at_k_by_T({conse_T: variant.predict(unseen_probs, k=10)}, list(unseen_photos.wnid)).iloc[0]
    _, variant_norms = variant.embed(probs_ok)
    rho = {f"rho(||f||, {c})": spearmanr(variant_norms, confidence[c]).statistic for c in confidence.columns}
    by_setting["unit vectors" if unit else "raw vectors"] = {
        **hits, **rho, "rho(||f||, mean length)": spearmanr(variant_norms, weighted_length).statistic}
normalisation = pd.DataFrame(by_setting).T
raw, unit = normalisation.loc["raw vectors"], normalisation.loc["unit vectors"]
hit_columns = [c for c in normalisation.columns if c.startswith("hit@")]
print(f"ConSE(T={conse_T}) with unit vectors against raw: hit@k higher at "
      f"{', '.join(c for c in hit_columns if unit[c] > raw[c]) or 'no k'}, lower at "
      f"{', '.join(c for c in hit_columns if unit[c] < raw[c]) or 'no k'}, differing by at most "
      f"{round((unit[hit_columns] - raw[hit_columns]).abs().max() * len(unseen_photos) / 100)} of {len(unseen_photos)} photos; "
      f"rank correlation of ||f(x)|| with the mean label length {raw['rho(||f||, mean length)']:.2f} (raw) "
      f"and {unit['rho(||f||, mean length)']:.2f} (unit)")
assert unit["rho(||f||, mean length)"] < raw["rho(||f||, mean length)"], \
    "the text says unit vectors take the label lengths out of ||f(x)||"
normalisation.round(3)

# %% [markdown]
# ## 9 · Sanity check on 1,000 real ImageNet photos
#
# *(Paper: its ConSE(1) and softmax rows on the 1,000 training classes.)* With $T=1$ and the
# training labels as candidates, $f(x) = s(\hat y_1)$, whose nearest candidate is $\hat y_1$
# itself, so ConSE(1) reproduces the softmax top-1 except in three situations, each counted
# below:
#
# 1. **no vector**: the softmax top-1 label has none, so ConSE(1) answers with the most
#    probable label that has one (section 4);
# 2. **same vector**: the top-1 label shares its vector with another training label (two
#    synsets with the same lemmas, e.g. the *crane* bird and the *crane* machine), and ConSE(1)
#    answers the group's first label in WNID order;
# 3. **tied probabilities**: the two largest probabilities are exactly equal.
#
# Case 1 can turn a wrong softmax answer into a right one and the reverse (a photo whose true
# label has no vector can never be a ConSE hit), so ConSE(1) may score above or below the
# softmax; the paper reports it slightly below (55.1 against 55.6; these two numbers are
# quoted from the paper's 1K table and not re-checked here, `PAPER_1K_HIT1`), and gives no
# breakdown, so whether its gap came from missing or shared vectors cannot be told. Ours is
# decomposed case by case under the table.
#
# The photos are the ImageNet sample (github.com/EliSchwartz/imagenet-sample-images), one
# per class, shorter side 256 px in the demo copy. Lite0's published ImageNet validation
# top-1 is 75.1 %; on these photos the softmax scores well above that (printed with its
# binomial standard error), most likely because they come from ImageNet's training split. So
# they compare the softmax with ConSE(1) on the same real photos; they do not estimate
# accuracy on new ones.

# %%
sample = imagenet_sample_photos(imagenet_sample_dir or None)
sample_outputs = cached_outputs("probs", sample.path.tolist(), classifier, dataset_id="imagenet-sample",
                                processes=extraction_processes, batch_size=batch_size, dtype="float32",
                                compute_dtype=compute_dtype, progress=False)
sample_ok = sample_outputs.ok
print(f"{len(sample)} photos of {sample.wnid.nunique()} classes, {int((~sample_ok).sum())} unreadable")

# %%
# NBVAL_CHECK_OUTPUT
print("training labels that share a vector:",
      ["  =  ".join(names[w] for w in group) for group in conse.label_collisions(train)])
sanity = conse.softmax_vs_conse1(sample_outputs.load()[sample_ok], train, true_labels=list(sample.wnid[sample_ok]))
conse.summarise_conse1_check(sanity).round(1)

# %%
n_sample = len(sanity)
softmax_hit1 = 100 * float((sanity.softmax_top1 == sanity.true_label).mean())
standard_error = float(np.sqrt(softmax_hit1 * (100 - softmax_hit1) / n_sample))
published = PUBLISHED_TOP1.get(classifier_name)
print(f"softmax top-1 on the {n_sample} photos: {softmax_hit1:.1f} % ± {standard_error:.1f} (binomial standard error); "
      f"published ImageNet validation top-1 of {classifier_name}: {published if published else 'not known here'} %")
assert published is None or softmax_hit1 - 2 * standard_error > published, \
    "the text says the softmax scores well above its published validation accuracy on these photos"
assert not (sanity.case == "other").any(), "the text says ConSE(1) differs from the softmax only in the three listed ways"
for case, rows in sanity[sanity.case != "agree"].groupby("case"):
    softmax_right, conse_right = int((rows.softmax_top1 == rows.true_label).sum()), int((rows.conse1_top1 == rows.true_label).sum())
    print(f"{case}: {len(rows)} photos; softmax right on {softmax_right}, ConSE(1) right on {conse_right} "
          f"({'+' if conse_right >= softmax_right else '-'}{abs(conse_right - softmax_right) * 100 / n_sample:.1f} points for ConSE(1))")
conse1_hit1 = 100 * float((sanity.conse1_top1 == sanity.true_label).mean())
print(f"in all: ConSE(1) {conse1_hit1:.1f} % against softmax {softmax_hit1:.1f} %, "
      f"{'above' if conse1_hit1 > softmax_hit1 else 'below' if conse1_hit1 < softmax_hit1 else 'equal to'} it")

# %% [markdown]
# ## What we saw
#
# * ConSE needs nothing but a classifier's probabilities and a vector per label: every number
#   above comes from off-the-shelf parts, with no training.
# * On photos of animals outside the 1,000 classes, the right animal is rarely ConSE's first
#   answer and is among its first ten for a minority of the photos (section 6); polysemous
#   words and averaged phrases are two failure modes seen in section 5, with GloVe-50d.
#   Synsets that share their lemmas share a vector and tie (section 2 counts them).
# * $T$ changes the answer: $T=1$ only translates the top guess, larger $T$ mixes in the
#   runners-up. Which $T$ scores best depends on $k$ (the lines printed in section 6); on a
#   few dozen photos the differences between $T$ values are a handful of images (at most
#   five, asserted there), so read the table as an illustration, not a measurement. In the
#   +1K setting ConSE(1) can only answer a training label.
# * $\lVert f(x) \rVert$ rises with the classifier's largest probability and falls with its
#   entropy (section 7: rank correlations, signs asserted there), so it can flag doubtful
#   predictions; with raw GloVe vectors it also follows their lengths (section 8).
# * ConSE(1) over the training labels is the softmax classifier again, except where labels
#   lack or share a vector or probabilities tie; on 1,000 real ImageNet photos section 9
#   counts each case and how it moves hit@1.
#
# ## Try it
#
# Each idea is one parameter away (`python -m zsl_utils run --profile demo --set NAME=VALUE`,
# or `papermill -p NAME VALUE`), or one cell using the public API:
#
# 1. **Another T.** `conse_T=1` and `conse_T=1000`: which examples of section 5 change their
#    answer, and why does ConSE(1) +1K score exactly 0 at hit@1?
# 2. **Unit vectors.** `unit_label_vectors=True`: does section 7's confidence signal get
#    better or worse?
# 3. **Another semantic space.** `semantic_space=minilm` embeds each label's lemmas with a
#    sentence encoder (384-d): are fewer labels missing, fewer sharing a vector?
# 4. **Another classifier.** `classifier_name=timm:resnet50` (timm fetches the weights once;
#    or pass `classifier_weights`).
# 5. **Your own photo and your own labels**, below: any image file and any words the
#    semantic space knows; ConSE ranks your labels for your photo.

# %%
my_photo = examples.path[0]  # any image file
my_labels = {"giraffe": ("giraffe",), "zebra": ("zebra",), "camel": ("camel",), "teapot": ("teapot",)}  # name: words
my_candidates = embed_labels(semantic_space, my_labels, device=device)
my_probs = classifier.probabilities(classifier.preprocess_images([my_photo]).to(torch_device)).cpu().numpy()
mine = conse.ConSE.from_embeddings(train, my_candidates, T=conse_T, device=torch_device).predict(my_probs, k=len(my_labels))
[(label, round(float(score), 3)) for label, score in zip(mine.labels(0), mine.scores[0])]

# %% [markdown]
# Notebook `02_imagenet_zero_shot_eval` evaluates ConSE on ImageNet's zero-shot test sets with the paper's metrics.
