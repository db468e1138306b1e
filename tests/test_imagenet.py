"""Label sets (hand-built graph and real WordNet), WNID lists, ConSE evaluation by hand."""
from __future__ import annotations

import numpy as np
import pytest

from zsl_utils.conse import imagenet
from zsl_utils.conse import model as conse
from zsl_utils.cache import ShardedCache
from zsl_utils.errors import DataLayoutError, ParameterError
from zsl_utils.conse.imagenet import EvalTask, build_label_sets, evaluate_conse
from zsl_utils.data import wnids
from zsl_utils.conse.model import ConSE
from zsl_utils.data.wnids import load_wnid_list
from zsl_utils.metrics import Hierarchy
from zsl_utils.semantic import LabelEmbeddings

# Hand-built is-a graph. Training labels: T1, T2.
#   root -> X -> T1 -> c_child ; X -> c_sib ; root -> Y -> T2 ; Y -> Z -> c_far ; root -> c_top
#   c_dag has parents T2 and c_top.
PARENTS = {"X": ["root"], "Y": ["root"], "T1": ["X"], "c_child": ["T1"], "c_sib": ["X"], "T2": ["Y"],
           "Z": ["Y"], "c_far": ["Z"], "c_top": ["root"], "c_dag": ["T2", "c_top"]}


def test_label_sets_on_hand_built_graph():
    tree = Hierarchy.from_parents(PARENTS)
    release = ["T1", "T2", "X", "c_child", "c_sib", "c_far", "c_top", "c_dag", "Z", "c_lost"]
    sets = build_label_sets(tree, training=["T1", "T2"], release=release, hop_edges={"near": 1, "mid": 2})
    assert sets.candidates == ["X", "c_child", "c_sib", "c_far", "c_top", "c_dag", "Z", "c_lost"]
    by_label = dict(zip(sets.candidates, sets.distance.tolist()))
    # X parent of T1 (1); c_child child (1); c_sib sibling (2); Z sibling of T2 (2); c_far (3);
    # c_dag child of T2 (1); c_top: T1 -> X -> root -> c_top (3); c_lost not in the graph (-1).
    assert by_label == {"X": 1, "c_child": 1, "c_sib": 2, "c_far": 3, "c_top": 3, "c_dag": 1, "Z": 2, "c_lost": -1}
    assert sets.test_sets["near"] == ["X", "c_child", "c_dag"]
    assert sets.test_sets["mid"] == ["X", "c_child", "c_sib", "c_dag", "Z"]
    assert sets.test_sets["all"] == sets.candidates
    assert sets.test_set("near", generalised=True) == ["T1", "T2", "X", "c_child", "c_dag"]
    with pytest.raises(ParameterError, match="unknown test set"):
        sets.test_set("4-hop")


def test_published_list_replaces_derived_set(tmp_path):
    tree = Hierarchy.from_parents({"n00000003": ["n00000001"], "n00000004": ["n00000002"],
                                   "n00000001": ["n00000009"], "n00000002": ["n00000009"]})
    listing = tmp_path / "2-hops.txt"
    listing.write_text("# published\nn00000004\nn00000003 a name is fine\nn00000004\n")
    release = ["n00000001", "n00000002", "n00000003", "n00000004"]
    sets = build_label_sets(tree, ["n00000001"], release, published_lists={"2-hop": listing})
    assert sets.test_sets["2-hop"] == ["n00000004", "n00000003"]
    assert "published" in sets.sizes().set_index("test set").loc["2-hop", "rule"]


def test_load_wnid_list_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("n01440764\ntench\n")
    with pytest.raises(DataLayoutError, match="bad.txt:2: 'tench' is not a WNID"):
        load_wnid_list(bad)
    good = tmp_path / "good.txt"
    good.write_text("n01440764, n01443537\n")
    assert load_wnid_list(good) == ["n01440764", "n01443537"]
    with pytest.raises(DataLayoutError, match="1 WNIDs are not in the label space"):
        load_wnid_list(good, known={"n01440764"})
    with pytest.raises(DataLayoutError, match="does not exist"):
        load_wnid_list(tmp_path / "nope.txt")


def test_load_wnid_list_json(tmp_path):
    text, listed = tmp_path / "all.txt", tmp_path / "all.json"
    text.write_text("n01440764\nn01443537\nn01440764\n")
    listed.write_text('["n01440764", "n01443537", "n01440764"]')
    assert load_wnid_list(listed) == load_wnid_list(text) == ["n01440764", "n01443537"]
    published = tmp_path / "published.txt"  # JSON by its first character, whatever the suffix
    published.write_text('  {"2-hops": ["n01443537"], "3-hops": ["n01440764", "n01443537"], "all": ["n01440764"]}')
    assert load_wnid_list(published, key="3-hops") == ["n01440764", "n01443537"]
    with pytest.raises(DataLayoutError, match=r"published.txt has 3 lists: pass .*key=.*\['2-hops', '3-hops', 'all'\]"):
        load_wnid_list(published)
    with pytest.raises(DataLayoutError, match=r"published.txt has no list '4-hops'.*\['2-hops', '3-hops', 'all'\]"):
        load_wnid_list(published, key="4-hops")
    with pytest.raises(DataLayoutError, match="1 WNIDs are not in the label space"):
        load_wnid_list(published, key="3-hops", known={"n01440764"})
    listed.write_text('{"all": ["n01440764", "tench", 3]}')  # a single list needs no key
    with pytest.raises(DataLayoutError, match="all.json: expected a JSON list of WNID strings.*found 'tench'"):
        load_wnid_list(listed)
    listed.write_text('["n01440764",')
    with pytest.raises(DataLayoutError, match="all.json is not valid JSON"):
        load_wnid_list(listed)


def test_real_label_sets(wordnet):
    """Invariants on WordNet 3.0 + timm's lists; sizes are those documented in the module."""
    hierarchy = imagenet.wordnet_hierarchy(wordnet)
    sets = build_label_sets(hierarchy)
    assert len(sets.training) == 1000 and len(wnids.imagenet_wnids("21k")) == 21841
    assert len(sets.candidates) == 20842  # n04399382 (teddy bear) is not in the 2011 release
    two, three = set(sets.test_sets["2-hop"]), set(sets.test_sets["3-hop"])
    assert two < three < set(sets.test_sets["all"])
    assert (len(two), len(three)) == (1548, 5982)
    training = set(sets.training)
    for wnid in sorted(two)[::97]:  # every 2-hop label is a parent or child of a training label
        synset = wordnet.synset(wnid)
        assert training & (set(synset.hypernyms) | set(synset.hyponyms)), wnid
    assert (sets.distance >= 1).all()  # every candidate is connected to some training label


# ----------------------------------------------------------------------------- evaluation
def _embeddings(labels, vectors, found=None):
    vectors = np.asarray(vectors, np.float32)
    found = np.ones(len(labels), bool) if found is None else np.asarray(found)
    return LabelEmbeddings(list(labels), vectors, found, [(l,) for l in labels], "toy")


TRAIN = _embeddings(["A", "B"], [[1, 0], [0, 1]])
LABELS = _embeddings(["A", "B", "c1", "c2", "c3", "c4"],
                     [[1, 0], [0, 1], [1, 0.1], [0.1, 1], [1, 1], [0, 0]], [1, 1, 1, 1, 1, 0])
# c1, c3 under X (with A); c2, c4 under Y (with B)
TOY_TREE = Hierarchy.from_parents({"A": ["X"], "c1": ["X"], "c3": ["X"], "B": ["Y"], "c2": ["Y"], "c4": ["Y"],
                                   "X": ["root"], "Y": ["root"]})
PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]], np.float32)
TRUE = ["c1", "c3", "c4", "A"]  # the last image is of a training label: in no zero-shot test set
TASKS = [EvalTask("zsl", ["c1", "c2", "c3", "c4"], frozenset({"c1", "c2", "c3", "c4"})),
         EvalTask("zsl +1K", ["A", "B", "c1", "c2", "c3", "c4"], frozenset({"c1", "c2", "c3", "c4"}))]


def test_evaluate_conse_hand_case():
    # ConSE(1) embeds each image as A or B's vector:
    #   img0 -> A: ranks c1, c3, c2        img1 -> B: ranks c2, c3, c1      img2 -> B: c2, c3, c1
    # zero-shot: hit@1 = 1/3 (img0), hit@2 = 2/3 (img0, img1); c4 has no vector: never predicted.
    # hp@2: S_2(c1) = {c1, c3} -> 1 ; S_2(c3) = {c3, c1} -> top c2, c3 -> 1/2 ; S_2(c4) = {c4, c2} -> 1/2.
    result = evaluate_conse(PROBS, TRUE, TRAIN, LABELS, TASKS, T_values=(1,), ks=(1, 2), hierarchy=TOY_TREE,
                            batch_size=2, keep_top=2, progress=False)
    table = result.table.set_index("test set")
    zsl = table.loc["zsl"]
    assert zsl["images"] == 3 and zsl["unembedded candidates"] == 1
    assert zsl["hit@1"] == pytest.approx(100 / 3) and zsl["hit@2"] == pytest.approx(200 / 3)
    assert zsl["hp@1"] == pytest.approx(100 / 3) and zsl["hp@2"] == pytest.approx(100 * 2 / 3)
    # +1K: A and B win their own images first; only img0 has its label (c1) second.
    generalised = table.loc["zsl +1K"]
    assert generalised["hit@1"] == 0 and generalised["hit@2"] == pytest.approx(100 / 3)
    assert result.rows["zsl"].tolist() == [0, 1, 2]
    top = result.top_predictions[("zsl", 1)]
    assert [[TASKS[0].candidates[j] for j in row] for row in top] == [["c1", "c3"], ["c2", "c3"], ["c2", "c3"]]


def test_named_embedders_are_ranked_like_conse():
    # an embedder that returns ConSE(1)'s f(x) must reproduce ConSE(1)'s rows, under its own model name
    model = ConSE(TRAIN.vectors, TRAIN.vectors, T=1, train_mask=TRAIN.found)
    conse1 = evaluate_conse(PROBS, TRUE, TRAIN, LABELS, TASKS, T_values=(1,), ks=(1, 2), hierarchy=TOY_TREE,
                            progress=False).table
    named = evaluate_conse(PROBS, TRUE, TRAIN, LABELS, TASKS, ks=(1, 2), hierarchy=TOY_TREE, progress=False,
                           embedders={"mine": lambda rows: model.embed(rows)}).table
    assert named.model.unique().tolist() == ["mine"]
    columns = ["hit@1", "hit@2", "hp@1", "hp@2"]
    np.testing.assert_allclose(named[columns].to_numpy(), conse1[columns].to_numpy())


def test_evaluate_from_cache_equals_array_and_skips_unreadable(tmp_path):
    cache = ShardedCache(tmp_path / "probs", {"toy": 1}, n_items=4, shard_size=3)
    ok = np.array([True, True, False, True])
    cache.write_shard(0, probs=PROBS[:3].astype(np.float16), ok=ok[:3])
    cache.write_shard(1, probs=PROBS[3:].astype(np.float16), ok=ok[3:])
    from_cache = evaluate_conse(cache, TRUE, TRAIN, LABELS, TASKS[:1], T_values=(1, 2), ks=(1, 2),
                                hierarchy=TOY_TREE, progress=False).table
    assert from_cache["images"].tolist() == [2, 2]  # img2 unreadable, img3 is a training label
    subset = evaluate_conse(PROBS[[0, 1]], ["c1", "c3"], TRAIN, LABELS, TASKS[:1], T_values=(1, 2), ks=(1, 2),
                            hierarchy=TOY_TREE, progress=False).table
    np.testing.assert_allclose(from_cache[["hit@1", "hit@2", "hp@2"]], subset[["hit@1", "hit@2", "hp@2"]])


def test_tasks_over_the_same_images_embed_once_and_match_separate_runs(monkeypatch):
    """'zsl' and 'zsl +1K' evaluate the same images: one check per batch, one f(x) per T
    for both, and exactly the numbers of evaluating each task on its own."""
    calls = {"check": 0, "embed": 0}
    original_check, original_embed = imagenet.check_probabilities, conse.ConSE.embed

    def counting_check(*args, **kwargs):
        calls["check"] += 1
        return original_check(*args, **kwargs)

    def counting_embed(self, *args, **kwargs):
        calls["embed"] += 1
        return original_embed(self, *args, **kwargs)

    monkeypatch.setattr(imagenet, "check_probabilities", counting_check)
    monkeypatch.setattr(conse.ConSE, "embed", counting_embed)
    seen = EvalTask("seen", ["A", "B", "c1"], frozenset({"A"}))
    tasks = [*TASKS, seen]
    together = evaluate_conse(PROBS, TRUE, TRAIN, LABELS, tasks, T_values=(1, 2), ks=(1, 2),
                              hierarchy=TOY_TREE, batch_size=2, keep_top=2, progress=False)
    # batches: rows 0-1 (zsl group only), rows 2-3 (zsl group: row 2; seen: row 3)
    assert calls == {"check": 2, "embed": 2 * 1 + 2 * 2}  # per batch: 2 T x groups with images
    for task in tasks:
        alone = evaluate_conse(PROBS, TRUE, TRAIN, LABELS, [task], T_values=(1, 2), ks=(1, 2),
                               hierarchy=TOY_TREE, batch_size=2, keep_top=2, progress=False)
        rows = together.table[together.table["test set"] == task.name].reset_index(drop=True)
        assert rows.equals(alone.table)
        for T in (1, 2):
            assert np.array_equal(together.top_predictions[(task.name, T)], alone.top_predictions[(task.name, T)])


def test_evaluate_checks_only_evaluated_rows():
    probs = PROBS.copy()
    probs[3, 0] = np.nan  # image 3 (a training label) is in no zero-shot test set: never read
    table = evaluate_conse(probs, TRUE, TRAIN, LABELS, TASKS, T_values=(1,), ks=(1, 2), hierarchy=TOY_TREE,
                           progress=False).table
    assert table["images"].tolist() == [3, 3]
    probs[1, 1] = -0.5  # image 1 is evaluated
    with pytest.raises(ParameterError, match="not logits"):
        evaluate_conse(probs, TRUE, TRAIN, LABELS, TASKS, T_values=(1,), ks=(1, 2), hierarchy=TOY_TREE,
                       progress=False)


def test_evaluate_rejects_missing_candidate_rows_and_small_sets():
    with pytest.raises(ParameterError, match="no row in label_embeddings"):
        evaluate_conse(PROBS, TRUE, TRAIN, LABELS.take([0, 1, 2]), TASKS[:1], T_values=(1,), ks=(1,),
                       hierarchy=TOY_TREE, progress=False)
    with pytest.raises(ParameterError, match="fewer than k=5"):
        evaluate_conse(PROBS, TRUE, TRAIN, LABELS, TASKS[:1], T_values=(1,), ks=(1, 5), hierarchy=TOY_TREE,
                       progress=False)


def test_paper_table_has_known_rows_and_nan_elsewhere():
    paper = imagenet.paper_results()
    assert set(paper["metric"]) == {"hit", "hp"}
    row = paper[(paper["metric"] == "hit") & (paper["test set"] == "2-hop") & (paper["model"] == "ConSE(10)")]
    assert row[["at1", "at20"]].values.tolist() == [[9.4, 41.8]]
    values = paper[["at1", "at2", "at5", "at10", "at20"]]
    filled = values.dropna()
    assert (filled.diff(axis=1).iloc[:, 1:] >= 0).all().all()  # hit@k never decreases with k
    assert (values.isna().all(axis=1) | values.notna().all(axis=1)).all()  # rows are all-or-nothing


def test_examples_and_classifier_hit_at_k():
    result = evaluate_conse(PROBS, TRUE, TRAIN, LABELS, TASKS[:1], T_values=(1,), ks=(1, 2), hierarchy=TOY_TREE,
                            keep_top=2, progress=False)
    examples = result.examples("zsl", 1, TRUE, n_hits=5, n_misses=5)
    assert sorted(examples["row"]) == [0, 1, 2]  # every evaluated image is either a hit or a miss
    assert examples.set_index("row").loc[1, "rank"] == 2 and examples.set_index("row").loc[2, "rank"] == 0
    # softmax over outputs A, B: image 3 (label A, p = 0.6 / 0.4) is the only one of a training class
    assert imagenet.classifier_hit_at_k(PROBS, TRUE, ["A", "B"], ks=(1, 2)).to_dict() == \
        {"images": 1, "hit@1": 100.0, "hit@2": 100.0}


def test_with_paper_numbers_puts_paper_rows_first():
    ours = evaluate_conse(PROBS, TRUE, TRAIN, LABELS, [EvalTask("2-hop", ["c1", "c2", "c3", "c4"],
                                                                frozenset({"c1", "c2", "c3", "c4"}))],
                          T_values=(1, 2), ks=(1, 2), hierarchy=TOY_TREE, progress=False).table
    table = imagenet.with_paper_numbers(ours, "hit", ks=(1, 2))
    two_hop = table[table["test set"] == "2-hop"]
    assert two_hop["source"].tolist() == ["paper"] * 4 + ["ours"] * 2
    assert two_hop.set_index(["source", "model"]).loc[("paper", "DeViSE"), "hit@1"] == 6.0
