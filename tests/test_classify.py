"""Classification on real Fashion-MNIST images, checked against an independent brute-force
reference: numpy over every stored vector, votes counted in plain Python."""
import numpy as np
import polars as pl
import pytest

from vismem_assets.voting import vote_weights


def reference_predictions(stored, stored_labels, queries, k, strategy):
    sims = queries @ stored.T
    out = []
    for row in sims:
        order = np.argsort(-row, kind="stable")[:k]
        w = vote_weights(row[order][None, :], strategy)[0]
        scores, best, best_score = {}, None, 0.0
        for j, wj in zip(order, w):
            lab = stored_labels[j]
            scores[lab] = scores.get(lab, 0.0) + wj
            if scores[lab] > best_score:
                best, best_score = lab, scores[lab]
        out.append((best, [int(j) for j in order]))
    return out


@pytest.fixture(scope="module")
def filled(tmp_path_factory, encoder, fm_sets):
    from vismem_assets.memory import Memory

    memory = Memory(tmp_path_factory.mktemp("classify") / "home", encoder=encoder)
    memory.add(fm_sets["train"], progress=False)
    return memory


def stored_vectors(memory):
    files = memory.ledger.query("SELECT DISTINCT path FROM embeddings")["path"].to_list()
    frame = pl.concat([pl.read_parquet(memory.layout.absolute(f)) for f in files]).sort("vector_id")
    labels = dict(memory.ledger.query("SELECT vector_id, label FROM samples WHERE status = 'active'").iter_rows())
    return frame["vector_id"].to_numpy(), frame["vector"].to_numpy(), [labels[v] for v in frame["vector_id"]]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["plurality", "distance"])
def test_predictions_match_brute_force_reference(filled, encoder, fm_sets, strategy):
    queries = sorted(fm_sets["test"].rglob("*.png"))
    vector_ids, stored, labels = stored_vectors(filled)
    q = encoder.embed(queries, progress=False)
    for k in (1, 5, 20):
        predictions = filled.classify(queries, k=k, strategy=strategy, progress=False)
        reference = reference_predictions(stored, labels, q, k, strategy)
        for p, (label, order) in zip(predictions, reference):
            assert p.label == label
            assert [n.vector_id for n in p.neighbors] == [int(vector_ids[j]) for j in order]


def test_prediction_explains_itself(filled, fm_sets):
    query = sorted((fm_sets["test"] / "Trouser").glob("*.png"))[0]
    (p,) = filled.classify([query], k=7, strategy="rank", progress=False)
    assert len(p.neighbors) == 7
    sims = [n.similarity for n in p.neighbors]
    assert sims == sorted(sims, reverse=True)
    assert [n.weight for n in p.neighbors] == pytest.approx([1 / (2 + r) for r in range(7)])
    for n in p.neighbors:
        row = filled.ledger.query("SELECT label, image_path FROM samples WHERE sample_id = ?", [n.sample_id])
        assert row["label"][0] == n.label
        assert n.image_path.endswith(row["image_path"][0])
    assert p.scores[p.label] == max(p.scores.values())
    assert p.confidence == pytest.approx(p.scores[p.label] / sum(p.scores.values()))


def test_evaluation_covers_every_strategy_and_k(filled, fm_sets):
    result = filled.evaluate(fm_sets["test"], k_max=30, progress=False)
    acc = result.accuracy
    assert set(acc["strategy"]) == {"rank", "softmax", "distance", "plurality"}
    assert acc.group_by("strategy").agg(pl.col("k").sort())["k"].to_list() == [list(range(1, 31))] * 4
    # 10 images per class in memory: far above chance (0.1) on real images.
    assert result.best()["accuracy"].min() > 0.5
    stored = filled.ledger.query("SELECT count(*) AS n FROM evaluations WHERE index_version = ?", [result.index_version])
    assert stored["n"][0] == 4 * 30
    # k=1 is the nearest neighbour for every strategy.
    assert acc.filter(pl.col("k") == 1)["accuracy"].n_unique() == 1
