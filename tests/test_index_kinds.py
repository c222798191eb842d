"""A new index kind is one module plus one registry line (index_kinds/): here a kind defined in
this test module alone, exact search over float16 vectors, goes through a real memory's add,
classify, forget and `audit verify`, with no other module of vismem knowing of it.

The kind: FAISS's `IndexScalarQuantizer` with `QT_fp16` (each dimension stored as IEEE half
precision, scored exhaustively by inner product) under an `IndexIDMap2`, so its ids, dropping
and the byte layout erasure needs come from `index_kinds.id_map`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np
import pytest

import vismem_assets
from vismem_assets import index_kinds
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.index_kinds import BuildReport, id_map
from vismem_assets.index_store import held_ids
from vismem_assets.index_types import IndexPolicy
from vismem_assets.memory import Memory
from vismem_assets.search import FaissSearcher

NAME = "flat-fp16"
FACTORY = "IDMap2,SQfp16"


class Float16Kind:
    """Exact search over float16 vectors: half the bytes of the flat kind, scores within ~1e-3."""
    name = NAME
    map_for_search = False

    def recognises(self, index) -> bool:
        top = faiss.downcast_index(index)
        if not isinstance(top, faiss.IndexIDMap2):
            return False
        inner = faiss.downcast_index(top.index)
        return isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16

    def describes(self, index_type: str) -> bool:
        return index_type == FACTORY

    def describe(self, index) -> str:
        return FACTORY

    def build(self, vector_ids, vectors, policy):
        inner = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(vector_ids, np.int64))
        return index, BuildReport(NAME, FACTORY, "float16: asked for", NAME)

    def nprobe(self, index):
        return None

    def ids(self, index):
        return id_map.ids(index)

    def exact_vectors(self, index):
        return None  # float16 is not the float32 the embedding files hold

    def shards(self, index, shard_bytes):
        return [index]

    def drop(self, index, vector_ids):
        id_map.drop(index, vector_ids)

    def searcher(self, index, holes):
        return FaissSearcher(index)

    def holes(self, path, index, targets, holes_too):
        return id_map.holes(path, index, targets, holes_too, item_bytes=1)


@pytest.fixture
def float16_kind():
    before = dict(index_kinds.REGISTRY)
    kind = index_kinds.register(Float16Kind())  # the one line a new kind needs
    yield kind
    index_kinds.REGISTRY.pop(NAME)
    assert index_kinds.REGISTRY == before


def sid(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_kind_defined_here_goes_through_add_classify_forget_and_audit(tmp_path, encoder, fm_sets, float16_kind):
    # Nothing in vismem knows this kind: the registry is the only thing it touched.
    package = Path(vismem_assets.__file__).parent
    assert not [p for p in package.rglob("*.py") if NAME in p.read_text() or FACTORY in p.read_text()]
    assert set(index_kinds.names()) - {"flat", "ivf-flat", "ivf-sq8", "ivf-pq"} == {NAME}

    memory = Memory(tmp_path / "home", encoder=encoder, index_policy=IndexPolicy(kind=NAME))
    memory.add(fm_sets["train"], progress=False)
    memory.add(fm_sets["more"], progress=False)  # past the delta share: folded into a new float16 base
    live = memory.indexes.live()
    assert live.index_type == FACTORY and live.n_vectors == 150 and live.build is None
    assert memory.indexes.versions()[0].build.kind == NAME
    path = memory.layout.absolute(live.path)
    assert index_kinds.kind_for(faiss.read_index(str(path))) is float16_kind
    ids, vectors = memory.stored_vectors()  # from the embedding files: the kind keeps no float32
    assert len(ids) == 150 and memory.index_consistency()["ok"]

    # Searched exactly over the float16 vectors: the brute-force order, scores within float16's precision.
    queries = sorted(fm_sets["test"].rglob("*.png"))
    q = encoder.embed(queries, progress=False)
    sims, found = memory.search(q, 10)
    exact = q @ vectors.astype(np.float16).astype(np.float32).T
    assert np.allclose(sims, -np.sort(-exact, axis=1)[:, :10], atol=1e-4)
    assert np.array_equal(found[:, 0], ids[np.argmax(exact, axis=1)])
    predictions = memory.classify(queries, k=10, progress=False)
    accuracy = np.mean([p.label == Path(p.path).parent.name for p in predictions])
    assert accuracy > 0.5

    # Forget some: their codes (float16, as the file stores them) are there, then gone.
    victims = sorted((fm_sets["train"] / "Sneaker").glob("*.png"))[:3] + sorted((fm_sets["more"] / "Bag").glob("*.png"))[:2]
    gone_ids = memory.ledger.query("SELECT vector_id FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                                   [[sid(v) for v in victims]])["vector_id"].to_numpy()
    codes = [vectors[ids == v][0].astype(np.float16).tobytes() for v in gone_ids]
    assert len(codes) == 5 and all(code in path.read_bytes() for code in codes)
    memory.forget(ForgetRequest(requested_by="test", reason="a new kind forgets too", images=[str(v) for v in victims]))
    after = memory.indexes.live()
    assert after.path == live.path and after.files[0].holes == 5 and after.n_vectors == 145  # erased in place
    assert not any(code in path.read_bytes() for code in codes)
    _, index = memory.live_index()
    assert not np.isin(gone_ids, held_ids(index)).any() and memory.index_consistency()["ok"]
    _, found = memory.search(encoder.embed(victims, progress=False), 145)
    assert not np.isin(gone_ids, found).any()
    for p in memory.classify(victims, k=10, progress=False):
        assert not {n.sample_id for n in p.neighbors} & {sid(v) for v in victims}
    assert memory.audit.verify().ok
