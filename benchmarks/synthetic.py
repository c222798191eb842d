"""A memory of N synthetic vectors, clustered like real embeddings (random uniform vectors
make approximate indexes and neighbourhoods look wrong): each vector is a cluster centre plus
Gaussian noise, L2-normalised; its label is its cluster. No images: only the ledger rows,
embedding files and index a real memory of that size would have."""
from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from vismem_assets.encoders import load_encoder
from vismem_assets.encoders.base import Encoder, Preprocessing
from vismem_assets.ledger import insert_rows
from vismem_assets.embedding import EMBED_CHUNK
from vismem_assets.memory import Memory


class QueryVectors(Encoder):
    """Stands in for the encoder in `classify`: the 'images' are row numbers of query vectors."""

    name = "bench-query-vectors"
    weights_sha256 = "0" * 64
    preprocessing = Preprocessing()

    def __init__(self, dim: int):
        self.dim = dim
        self.queries = np.zeros((0, dim), np.float32)

    def forward(self, batch):  # never called: embed hands over stored vectors
        raise NotImplementedError

    def embed(self, images, progress=None, desc="", **kwargs) -> np.ndarray:
        return self.queries[np.asarray(images, dtype=np.int64)]


def clustered_vectors(n: int, d: int, n_clusters: int = 100, noise: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    labels = rng.integers(0, n_clusters, n)
    x = centres[labels] + noise * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def insert_vectors(memory: Memory, vectors: np.ndarray, labels: np.ndarray, prefix: str,
                   chunk: int = EMBED_CHUNK) -> None:
    """Ledger rows + parquet embeddings (parts of EMBED_CHUNK rows, as `vismem add` writes them)
    for synthetic samples; no index work (that is what the benchmarks time)."""
    n = len(vectors)
    ids = [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest() for i in range(n)]
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        name = f"{prefix}-{start // chunk:04d}"
        with memory.ledger.transaction() as con:
            con.execute("INSERT INTO image_sets VALUES (?, 'synthetic', now(), now())", [name])
            pos, lengths = memory.ledger.names.append(con, [f"img-{i}.png" for i in range(start, start + len(ids[part]))])
            insert_rows(con, "samples", {
                "sample_id": ("VARCHAR", ids[part]),
                "label": ("VARCHAR", [f"c{c:03d}" for c in labels[part]]),
                "image_set": ("VARCHAR", [name] * len(ids[part])),
                "status": ("VARCHAR", ["active"] * len(ids[part])),
                "name_pos": ("BIGINT", pos), "name_len": ("INTEGER", lengths),
            }, added_at="now()", vector_id="nextval('vector_id_seq')")
            insert_rows(con, "sample_sources", {
                "sample_id": ("VARCHAR", ids[part]), "image_set": ("VARCHAR", [name] * len(ids[part])),
                "ingest_id": ("BIGINT", [0] * len(ids[part])),
                "name_pos": ("BIGINT", pos), "name_len": ("INTEGER", lengths),
            }, arrived_at="now()")
            vector_of = dict(con.execute("SELECT sample_id, vector_id FROM samples"
                                         " WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))", [ids[part]]).fetchall())
        path = memory.embeddings.write(name, ids[part], np.array([vector_of[i] for i in ids[part]]), vectors[part])
        with memory.ledger.transaction() as con:
            insert_rows(con, "embeddings", {"encoder_id": ("VARCHAR", [memory.encoder.id] * len(ids[part])),
                                            "sample_id": ("VARCHAR", ids[part]),
                                            "path": ("VARCHAR", [path] * len(ids[part]))}, embedded_at="now()")


def bench_encoder(d: int) -> Encoder:
    """What a scale run of dimension d stands in for: the default encoder (1280: its id and
    dimension; its model is never loaded), else an encoder of that dimension (384: DINOv2-S's)."""
    return load_encoder("efficientnet-lite0") if d == 1280 else QueryVectors(d)


TEMPLATE_FROM = 100_000           # memories this large are built once a process, then copied
_templates: dict[tuple, Path] = {}


def build_memory(home: Path, n: int, encoder, seed: int = 0, index_policy=None) -> Memory:
    """A memory with a live index over n synthetic samples of the encoder's dimension. Its
    ledger and embedding files (minutes at 10^6) are built once a process and copied after."""
    t0 = time.perf_counter()
    key = (n, encoder.id, encoder.dim, seed)
    if key in _templates:
        shutil.copytree(_templates[key], home)
        how = "copied"
    else:
        vectors, labels = clustered_vectors(n, encoder.dim, seed=seed)
        insert_vectors(Memory(home, encoder=encoder), vectors, labels, f"synthetic-{seed}")
        if n >= TEMPLATE_FROM:
            _templates[key] = Path(tempfile.mkdtemp(prefix="vismem-bench-template-")) / "home"
            atexit.register(shutil.rmtree, _templates[key].parent, True)
            shutil.copytree(home, _templates[key])
        how = "built"
    memory = Memory(home, encoder=encoder, index_policy=index_policy)
    memory.index_pending()
    print(f"{how} a synthetic memory of {n} vectors (d={encoder.dim}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return memory
