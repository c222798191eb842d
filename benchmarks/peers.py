"""vismem beside its peers (issue 20): LanceDB and plain FAISS on the same vectors, each in its
own process, taking turns.

    python -m benchmarks.peers [--n 1000000] [--d 384] [--json] [--json-to FILE] [--no-write]

The driver draws N clustered vectors (benchmarks/synthetic.py), 1,000 held-out queries from the
same clusters, three batches to add and three to delete (min(10,000, N / 20) each), and the
exact top 10 of every query; then runs one worker a system (`--worker NAME`), one after the
other, on those files. Every worker does the same things in the same order:

- exact search, one query a call and 1,000 a call;
- IVF (vismem's build: its nlist, the nprobe its build chose; the peers the same nlist and the
  smallest nprobe reaching vismem's recall@10 on these queries), one query a call through the
  searcher (and, for vismem, through `Memory.search`) and 1,000 a call;
- three adds: the index step, and stored-and-indexed (what a restart keeps), then the first
  search a reader makes after it;
- three deletes: the call, and the time until no byte of a deleted vector is left in any file
  (a byte scan of the system's directory proves it), then the first search after;
- the disk the memory takes (vismem: the live version only, as a peer holds one copy);
- for vismem, the floor under its forget call on this disk (`erase_floor`): the same number of
  vectors zeroed in place in files the size of each copy the forget reached, and synced (and
  the same for the first copy alone, the first two, ...: what fewer copies would cost).

Figures are medians of 3 (one query a call: as many queries as fit in 5 s, at least 3; a
1,000-query call that takes over 20 s runs once). Without `--no-write` the table goes into
benchmarks/peers.json, and from it into benchmarks/RESULTS.md (`benchmarks.report` keeps it).
LanceDB is an optional extra: `pip install -e '.[peers]'`; without it its column says so.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 10
SYSTEMS = ("vismem", "lancedb", "faiss")
SINGLE_BUDGET_S = 5.0   # per repeat of the one-query-a-call figures
SLOW_BATCH_S = 20.0     # a 1,000-query call slower than this runs once
RESULTS = Path(__file__).with_name("RESULTS.md")
PEERS_JSON = Path(__file__).with_name("peers.json")
def markers(n: int) -> tuple[str, str]:
    """Where the section of a run at N begins and ends in RESULTS.md (one section per N)."""
    return f"<!-- peers n={n}: begin -->", f"<!-- peers n={n}: end -->"


# ---- measuring ----------------------------------------------------------------------------------

def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def single_qps(search_one, queries: np.ndarray, repeats: int = 3) -> float:
    """Queries a second, one a call, over as many queries as fit in the budget (median of repeats)."""
    rates = []
    for _ in range(repeats):
        t0, done = time.perf_counter(), 0
        while done < len(queries) and (done < 3 or time.perf_counter() - t0 < SINGLE_BUDGET_S):
            search_one(queries[done:done + 1])
            done += 1
        rates.append(done / (time.perf_counter() - t0))
    return statistics.median(rates)


def batch_qps(search_all, queries: np.ndarray, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Queries a second, all in one call, and the rows it found (for recall)."""
    times, found = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = search_all(queries)
        times.append(time.perf_counter() - t0)
        if times[-1] > SLOW_BATCH_S:
            break
    return len(queries) / statistics.median(times), found


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)]))


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def vectors_on_disk(root: Path, vectors: np.ndarray, chunk: int = 64 << 20) -> int:
    """How many of these vectors have bytes left in a file under root: a vector counts when the
    8 bytes of its first two float32s, or of the two at its middle, occur at any byte offset
    (a random 64-bit window never occurs by chance; a vector stored in part still counts)."""
    v = np.ascontiguousarray(vectors, dtype="<f4").view("<u4")
    mid = v.shape[1] // 2
    windows = np.concatenate([v[:, 0].astype(np.uint64) | (v[:, 1].astype(np.uint64) << 32),
                              v[:, mid].astype(np.uint64) | (v[:, mid + 1].astype(np.uint64) << 32)])
    owner = np.concatenate([np.arange(len(v)), np.arange(len(v))])
    order = np.argsort(windows)
    windows, owner = windows[order], owner[order]
    first_words = np.zeros(1 << 24, bool)
    first_words[(windows & 0xFFFFFF).astype(np.int64)] = True
    found = np.zeros(len(v), bool)
    for path in (p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        size = path.stat().st_size
        if size < 8:
            continue
        data = np.memmap(path, np.uint8, mode="r")
        for start in range(0, size, chunk):
            piece = np.asarray(data[start:min(size, start + chunk + 8)])
            for shift in range(4):
                words = piece[shift:shift + (len(piece) - shift) // 4 * 4].view("<u4")
                at = np.flatnonzero(first_words[words[:-1] & 0xFFFFFF])
                if not len(at):
                    continue
                pairs = words[at].astype(np.uint64) | (words[at + 1].astype(np.uint64) << 32)
                hit = np.searchsorted(windows, pairs)
                hit = hit[(hit < len(windows)) & (windows[np.minimum(hit, len(windows) - 1)] == pairs)]
                found[owner[hit]] = True
        del data
    return int(found.sum())


def erase_floor(folder: Path, sizes: list[int], n_vectors: int, width: int, repeats: int = 3) -> list[float]:
    """What this disk alone takes to erase `n_vectors` vectors of `width` bytes in place in one file
    of each of these sizes (the copies a forget must reach), the floor under any forget call: the
    files written whole and synced first, then, each repeat, the vectors at random slots zeroed
    through a mapping and the files synced together (vismem's own write path, patches.apply, with
    nothing to find, hash or record). Returns the median of repeats for the first copy alone, the
    first two, ..., all of them (what a forget reaching fewer copies would wait for); the files
    are removed after."""
    from vismem_assets.patches import Holes, Patch, apply

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"copy-{i}.bin" for i in range(len(sizes))]
    chunk = np.zeros(64 << 20, np.uint8)
    try:
        for path, size in zip(paths, sizes):
            with open(path, "wb") as f:
                for at in range(0, size, len(chunk)):
                    f.write(chunk[:min(len(chunk), size - at)])
                f.flush()
                os.fsync(f.fileno())
        rng, floors = np.random.default_rng(5), []
        for reached in range(1, len(paths) + 1):
            times = []
            for _ in range(repeats):
                holes = {}
                for path, size in zip(paths[:reached], sizes):
                    slots = np.sort(rng.choice(size // width, min(n_vectors, size // width), replace=False))
                    holes[path] = Holes(slots, (Patch(slots * width, bytes(width)),))
                times.append(seconds(lambda: apply(holes)))
            floors.append(statistics.median(times))
        return floors
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the workers: one a system, each in its own process ------------------------------------------

class Data:
    """The driver's files, read by every worker."""

    def __init__(self, folder: Path):
        self.folder = folder
        load = lambda name: np.load(folder / f"{name}.npy")  # noqa: E731
        self.vectors, self.labels, self.queries, self.truth = (load(n) for n in ("vectors", "labels", "queries", "truth"))
        self.adds, self.deletes = load("adds"), load("deletes")   # (3, A, d) vectors; (3, D) rows
        self.settings = json.loads((folder / "settings.json").read_text())

    @property
    def n(self) -> int:
        return len(self.vectors)


def worker_vismem(data: Data, home: Path) -> dict:
    from benchmarks.synthetic import QueryVectors, insert_vectors
    from vismem_assets.forgetting import ForgetRequest
    from vismem_assets.index_types import IndexPolicy
    from vismem_assets.memory import Memory
    from vismem_assets.shards import search_all

    encoder = QueryVectors(data.vectors.shape[1])
    out: dict = {}
    memory = Memory(home, encoder=encoder, index_policy=IndexPolicy(kind="flat"))
    out["store_s"] = seconds(lambda: insert_vectors(memory, data.vectors, data.labels, "peers"))
    out["index_flat_s"] = seconds(lambda: memory.index_pending(embed=False))
    vector_ids = np.array(memory.ledger.query("SELECT vector_id FROM samples ORDER BY vector_id")["vector_id"].to_list())
    rows = lambda found: np.where(found >= 0, np.searchsorted(vector_ids, found), -1)  # noqa: E731

    def measure(prefix: str):
        memory.search(data.queries[:1], K)
        searchers = memory.recall.live_files().searchers()
        out[f"{prefix}_single_searcher_qps"] = single_qps(lambda q: search_all(searchers, q, K), data.queries)
        out[f"{prefix}_single_qps"] = single_qps(lambda q: memory.search(q, K), data.queries)
        out[f"{prefix}_batch_qps"], found = batch_qps(lambda q: memory.search(q, K)[1], data.queries)
        out[f"{prefix}_recall"] = recall_at_k(rows(found), data.truth)

    measure("exact")
    memory = Memory(home, encoder=encoder, index_policy=IndexPolicy(kind="ivf-flat"))
    t0 = time.perf_counter()
    build = memory.rebuild().build
    out["index_ivf_s"] = time.perf_counter() - t0
    out["nlist"], out["nprobe"] = build.nlist, build.nprobe
    measure("ivf")

    adds, add_index, first_add = [], [], []
    for i, batch in enumerate(data.adds):
        t_store = seconds(lambda: insert_vectors(memory, batch, np.zeros(len(batch), int), f"added-{i}"))
        t_index = seconds(lambda: memory.index_pending(embed=False))
        adds.append(t_store + t_index)
        add_index.append(t_index)
        first_add.append(seconds(lambda: memory.search(data.queries[:1], K)))
    out["add_index_s"], out["add_stored_s"] = statistics.median(add_index), statistics.median(adds)
    out["first_search_after_add_s"] = statistics.median(first_add)

    calls, first_forget, left, phases = [], [], [], []
    for victims in data.deletes:
        ids = [hashlib.sha256(f"peers-{i}".encode()).hexdigest() for i in victims]
        request = ForgetRequest(requested_by="bench", reason="peers", sample_ids=ids)
        calls.append(seconds(lambda: phases.append(memory.forget(request).phases)))
        first_forget.append(seconds(lambda: memory.search(data.queries[:1], K)))
        left.append(vectors_on_disk(home, data.vectors[victims]))
    out["delete_call_s"] = out["delete_clean_s"] = statistics.median(calls)
    out["forget_phases"] = {step: statistics.median(p[step] for p in phases) for step in phases[0]}   # where it goes
    out["first_search_after_delete_s"] = statistics.median(first_forget)
    out["deleted_vectors_left"] = max(left)
    # Every copy the forgets reached: the live version's files, the retained ones', the embedding parts.
    live = {f.path for f in memory.indexes.live().files}
    named = memory.indexes.named_files()
    sizes = {"live index": sum(memory.layout.absolute(p).stat().st_size for p in live),
             "retained versions": sum(memory.layout.absolute(p).stat().st_size for p in named if p not in live),
             "embedding parts": disk_bytes(home / "embeddings")}
    out["forget_copies"] = {copy: size for copy, size in sizes.items() if size}
    out["erase_floor_by_copies_s"] = erase_floor(home.parent / "vismem-floor", list(out["forget_copies"].values()),
                                                 data.deletes.shape[1], data.vectors.shape[1] * 4)
    out["erase_floor_s"] = out["erase_floor_by_copies_s"][-1]
    memory.indexes.retain(1)   # the live version only: a peer holds one copy
    out["disk_bytes"] = disk_bytes(home)
    out["disk_parts"] = {part: disk_bytes(home / part) for part in ("embeddings", "indexes")}
    out["disk_parts"]["ledger"] = memory.layout.ledger.stat().st_size
    return out


def worker_faiss(data: Data, home: Path) -> dict:
    import faiss

    from vismem_assets.index_kinds.ivf import held_out_and_training

    d, out = data.vectors.shape[1], {}
    ids = np.arange(data.n, dtype=np.int64)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    out["index_flat_s"] = seconds(lambda: flat.add_with_ids(data.vectors, ids))
    out["exact_single_searcher_qps"] = single_qps(lambda q: flat.search(q, K), data.queries)
    out["exact_batch_qps"], found = batch_qps(lambda q: flat.search(q, K)[1], data.queries)
    out["exact_recall"] = recall_at_k(found, data.truth)
    flat.reset()   # its memory back before the IVF index

    nlist = out["nlist"] = data.settings["nlist"]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    path = home / "memory.faiss"

    def build():
        index.train(data.vectors[held_out_and_training(data.n, "ivf-flat", nlist)[1]])
        index.add_with_ids(data.vectors, ids)
        store(index, path)
    out["index_ivf_s"] = seconds(build)
    out["nprobe"] = index.nprobe = _smallest_nprobe(lambda p, q: _ivf_search(index, p, q), data, nlist)
    out["ivf_single_searcher_qps"] = single_qps(lambda q: index.search(q, K), data.queries)
    out["ivf_batch_qps"], found = batch_qps(lambda q: index.search(q, K)[1], data.queries)
    out["ivf_recall"] = recall_at_k(found, data.truth)

    next_id, add_index, adds, first_add = data.n, [], [], []
    for batch in data.adds:
        new = np.arange(next_id, next_id + len(batch), dtype=np.int64)
        next_id += len(batch)
        add_index.append(seconds(lambda: index.add_with_ids(batch, new)))
        adds.append(add_index[-1] + seconds(lambda: store(index, path)))
        first_add.append(seconds(lambda: index.search(data.queries[:1], K)))
    out["add_index_s"], out["add_stored_s"] = statistics.median(add_index), statistics.median(adds)
    out["first_search_after_add_s"] = statistics.median(first_add)

    calls, cleans, first_delete, left = [], [], [], []
    for victims in data.deletes:
        calls.append(seconds(lambda: index.remove_ids(faiss.IDSelectorBatch(victims.astype(np.int64)))))
        cleans.append(calls[-1] + seconds(lambda: store(index, path)))
        first_delete.append(seconds(lambda: index.search(data.queries[:1], K)))
        left.append(vectors_on_disk(home, data.vectors[victims]))
    out["delete_call_s"], out["delete_clean_s"] = statistics.median(calls), statistics.median(cleans)
    out["first_search_after_delete_s"] = statistics.median(first_delete)
    out["deleted_vectors_left"] = max(left)
    centroids = {bytes(c) for c in index.quantizer.reconstruct_n(0, nlist)}
    out["deleted_vectors_that_are_centroids"] = sum(bytes(v) in centroids for v in data.vectors[data.deletes.ravel()])
    out["disk_bytes"] = disk_bytes(home)
    return out


def store(index, path: Path) -> None:
    """Written whole beside the file, synced, renamed over it: what a restart finds."""
    import faiss
    tmp = path.with_suffix(".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ivf_search(index, nprobe: int, queries: np.ndarray) -> np.ndarray:
    index.nprobe = nprobe
    return index.search(queries, K)[1]


def _smallest_nprobe(search, data: Data, nlist: int) -> int:
    """The smallest nprobe whose recall@10 on the benchmark's queries reaches vismem's."""
    target = data.settings["target_recall"]
    nprobe = 1
    while nprobe < nlist and recall_at_k(search(nprobe, data.queries), data.truth) < target:
        nprobe += 1 if nprobe < 16 else max(1, nprobe // 8)
    return min(nprobe, nlist)


def worker_lancedb(data: Data, home: Path) -> dict:
    from datetime import timedelta

    import lancedb
    import pyarrow as pa

    d, out = data.vectors.shape[1], {}

    def table_of(vectors, ids):
        flat = pa.array(np.ascontiguousarray(vectors, np.float32).ravel(), pa.float32())
        return pa.table({"id": pa.array(ids, pa.int64()), "vector": pa.FixedSizeListArray.from_arrays(flat, d)})

    db = lancedb.connect(home)
    out["store_s"] = seconds(lambda: db.create_table("memory", table_of(data.vectors, np.arange(data.n))))
    table = db.open_table("memory")
    # a second reader, as a serving process: it sees each commit on its next query
    reader = lancedb.connect(home, read_consistency_interval=timedelta(0)).open_table("memory")

    def search(tbl, queries, exact=False, nprobe=None):
        q = tbl.search(queries if len(queries) > 1 else queries[0]).distance_type("dot").limit(K).select(["id", "_distance"])
        q = q.bypass_vector_index() if exact else q.nprobes(nprobe) if nprobe else q
        result = q.to_arrow()
        ids = result["id"].to_numpy()
        if len(queries) == 1:
            return ids[None]
        which = result["query_index"].to_numpy()
        found = np.full((len(queries), K), -1, np.int64)
        for i in range(len(queries)):
            hit = ids[which == i][:K]
            found[i, :len(hit)] = hit
        return found

    out["exact_single_searcher_qps"] = single_qps(lambda q: search(table, q, exact=True), data.queries)
    out["exact_batch_qps"], found = batch_qps(lambda q: search(table, q, exact=True), data.queries)
    out["exact_recall"] = recall_at_k(found, data.truth)

    nlist = out["nlist"] = data.settings["nlist"]

    def index():
        table.create_index(metric="dot", num_partitions=nlist, vector_column_name="vector", index_type="IVF_FLAT")
    out["index_ivf_s"] = seconds(index)
    nprobe = out["nprobe"] = _smallest_nprobe(lambda p, q: search(table, q, nprobe=p), data, nlist)
    out["ivf_single_searcher_qps"] = single_qps(lambda q: search(table, q, nprobe=nprobe), data.queries)
    out["ivf_batch_qps"], found = batch_qps(lambda q: search(table, q, nprobe=nprobe), data.queries)
    out["ivf_recall"] = recall_at_k(found, data.truth)

    search(reader, data.queries[:1], nprobe=nprobe)
    next_id, add_index, adds, first_add = data.n, [], [], []
    for batch in data.adds:
        stored = seconds(lambda: table.add(table_of(batch, np.arange(next_id, next_id + len(batch)))))
        next_id += len(batch)
        first_add.append(seconds(lambda: search(reader, data.queries[:1], nprobe=nprobe)))
        add_index.append(seconds(lambda: table.optimize()))   # folds the new rows into the index
        adds.append(stored + add_index[-1])
    out["unindexed_rows_before_optimize"] = len(data.adds[0])
    out["add_index_s"], out["add_stored_s"] = statistics.median(add_index), statistics.median(adds)
    out["first_search_after_add_s"] = statistics.median(first_add)

    calls, cleans, first_delete, left, how, after_optimize = [], [], [], [], [], []
    for victims in data.deletes:
        where = f"id IN ({','.join(map(str, victims))})"
        calls.append(seconds(lambda: table.delete(where)))
        first_delete.append(seconds(lambda: search(reader, data.queries[:1], nprobe=nprobe)))
        # its own way to drop old data: optimize, keeping no older version
        clean = seconds(lambda: table.optimize(cleanup_older_than=timedelta(0), delete_unverified=True))
        step = "optimize"
        after_optimize.append(vectors_on_disk(home, data.vectors[victims]))
        if after_optimize[-1]:
            # the deleted rows are only marked in their data files (and kept in the index's):
            # rewrite the table without them, index it again, drop every older version
            def rewrite():
                nonlocal table
                table = db.create_table("memory", table.to_arrow(), mode="overwrite")
                index()
                table.optimize(cleanup_older_than=timedelta(0), delete_unverified=True)
            clean += seconds(rewrite)
            step = "optimize, then rewrite and re-index"
        cleans.append(calls[-1] + clean)
        how.append(step)
        left.append(vectors_on_disk(home, data.vectors[victims]))
    out["delete_call_s"], out["delete_clean_s"] = statistics.median(calls), statistics.median(cleans)
    out["delete_clean_by"] = how[-1]
    out["deleted_vectors_left_after_optimize"] = max(after_optimize)
    out["first_search_after_delete_s"] = statistics.median(first_delete)
    out["deleted_vectors_left"] = max(left)
    out["disk_bytes"] = disk_bytes(home)
    return out


WORKERS = {"vismem": worker_vismem, "lancedb": worker_lancedb, "faiss": worker_faiss}


def lancedb_missing() -> str | None:
    import importlib.util
    return None if importlib.util.find_spec("lancedb") else "not installed: pip install -e '.[peers]'"


# ---- the driver -----------------------------------------------------------------------------------

def prepare(folder: Path, n: int, d: int) -> None:
    import faiss

    from .search import held_out_queries
    from .synthetic import clustered_vectors

    vectors, labels = clustered_vectors(n, d, seed=0)
    queries = held_out_queries(1000, d)
    flat = faiss.IndexFlatIP(d)
    flat.add(vectors)
    size = min(10_000, n // 20)
    deletes = np.random.default_rng(3).permutation(n)[:3 * size].reshape(3, size)
    adds = held_out_queries(3 * size, d, query_seed=4).reshape(3, size, d)
    for name, value in (("vectors", vectors), ("labels", labels), ("queries", queries),
                        ("truth", flat.search(queries, K)[1]), ("adds", adds), ("deletes", deletes)):
        np.save(folder / f"{name}.npy", value)


def run_worker(system: str, folder: Path, settings: dict) -> dict:
    (folder / "settings.json").write_text(json.dumps(settings))
    home = folder / system
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    print(f"peers: {system} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # (the peers' deprecation notices and LanceDB's warnings would bury the log)
    done = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-m", "benchmarks.peers",
                           "--worker", system, "--data", str(folder)], stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).parent.parent, env={**os.environ, "LANCEDB_LOG": "error"})
    shutil.rmtree(home, ignore_errors=True)
    if done.returncode:
        raise RuntimeError(f"the {system} worker failed (exit {done.returncode}); its log is above")
    print(f"peers: {system} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(n: int = 200_000, d: int = 384, systems=SYSTEMS) -> dict:
    with tempfile.TemporaryDirectory(prefix="vismem-bench-peers-") as tmp:
        folder = Path(tmp)
        prepare(folder, n, d)
        result = {"n": n, "d": d, "k": K, "queries": 1000, "threads": _threads(),
                  "add_vectors": min(10_000, n // 20), "delete_vectors": min(10_000, n // 20), "systems": {}}
        vismem = run_worker("vismem", folder, {})
        result["systems"]["vismem"] = vismem
        settings = {"nlist": vismem["nlist"], "target_recall": vismem["ivf_recall"]}
        for system in systems:
            if system == "vismem":
                continue
            missing = lancedb_missing() if system == "lancedb" else None
            result["systems"][system] = {"missing": missing} if missing else run_worker(system, folder, settings)
    faiss_disk = result["systems"]["faiss"]["disk_bytes"] if "faiss" in result["systems"] else None
    result.update({
        "single_query_ratio": round(vismem["ivf_single_qps"] / vismem["ivf_single_searcher_qps"], 3),
        "exact_single_query_ratio": round(vismem["exact_single_qps"] / vismem["exact_single_searcher_qps"], 3),
        "switch_after_add_s": round(vismem["first_search_after_add_s"], 4),
        "switch_after_forget_s": round(vismem["first_search_after_delete_s"], 4),
        "forget_call_s": round(vismem["delete_call_s"], 4),
        "forget_floor_s": round(vismem["erase_floor_s"], 4),
        "no_deleted_byte_left": vismem["deleted_vectors_left"] == 0,
        "disk_ratio_to_faiss": round(vismem["disk_bytes"] / faiss_disk, 3) if faiss_disk else None,
    })
    return result


def _threads() -> int:
    import faiss
    return faiss.omp_get_max_threads()


# ---- the table ------------------------------------------------------------------------------------

def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def render(r: dict) -> str:
    systems = r["systems"]
    names = [s for s in SYSTEMS if s in systems]
    header = {"vismem": "vismem", "lancedb": "LanceDB 0.40.0", "faiss": "FAISS (plain)"}

    def cell(system: str, fn) -> str:
        s = systems[system]
        if "missing" in s:
            return s["missing"]
        try:
            return fn(s)
        except KeyError:
            return "–"

    rows = [
        ("exact search, 1 / 1,000 queries a call", "qps",
         lambda s: f"{_f(s['exact_single_searcher_qps'])} / {_f(s['exact_batch_qps'])}"),
        ("IVF, 1 query a call: its searcher / `Memory.search`", "qps",
         lambda s: f"{_f(s['ivf_single_searcher_qps'])}" + (f" / {_f(s['ivf_single_qps'])}" if "ivf_single_qps" in s else "")),
        ("IVF, 1,000 queries a call", "qps", lambda s: _f(s["ivf_batch_qps"])),
        ("IVF recall@10 (nlist, nprobe)", "", lambda s: f"{s['ivf_recall']:.3f} ({s['nlist']}, {s['nprobe']})"),
        (f"add {r['add_vectors']:,}: the index step / stored and indexed", "s",
         lambda s: f"{_f(s['add_index_s'])} / {_f(s['add_stored_s'])}"),
        ("first search after an add / after a delete", "s",
         lambda s: f"{_f(s['first_search_after_add_s'])} / {_f(s['first_search_after_delete_s'])}"),
        (f"delete {r['delete_vectors']:,}: the call / until no deleted byte is on disk", "s",
         lambda s: f"{_f(s['delete_call_s'])} / {_f(s['delete_clean_s'])}"),
        ("deleted vectors with bytes left after that (byte scan)", "", lambda s: str(s["deleted_vectors_left"])),
        ("disk for the memory", "GB", lambda s: f"{s['disk_bytes'] / 1e9:.3g}"),
    ]
    begin, end = markers(r["n"])
    lines = [begin, f"## Beside LanceDB and plain FAISS, N = {r['n']:,}, d = {r['d']}", "",
             f"`python -m benchmarks.peers --n {r['n']}`: the same clustered vectors, {r['queries']:,} held-out queries,"
             f" k = {r['k']}, {r['threads']} threads; each system in its own process, one after the other; medians of 3."
             " IVF: vismem's build chose nlist and nprobe; the peers use the same nlist and the smallest nprobe reaching"
             " vismem's recall on these queries. FAISS keeps the memory in one file, written whole on each change;"
             " its first search after a change is in memory.", "",
             "| operation | " + " | ".join(header[s] for s in names) + " | unit |",
             "|---|" + "---|" * len(names) + "---|"]
    lines += [f"| {label} | " + " | ".join(cell(s, fn) for s in names) + f" | {unit} |" for label, unit, fn in rows]
    v = systems["vismem"]
    parts = v.get("disk_parts", {})
    lines += ["", f"Issue 20's figures: `Memory.search` ÷ its searcher, one IVF query a call {r['single_query_ratio']}"
              f" (exact {r['exact_single_query_ratio']}); first search after an add {r['switch_after_add_s']} s, after a"
              f" forget {r['switch_after_forget_s']} s; the forget call {r['forget_call_s']} s with no deleted byte left:"
              f" {r['no_deleted_byte_left']}; disk ÷ FAISS's {r['disk_ratio_to_faiss']}."]
    if parts:
        lines += ["", "vismem's disk: " + ", ".join(f"{k} {b / 1e9:.3g} GB" for k, b in parts.items()) +
                  ". The embedding parts are the encoder's output, kept so that a damaged index, another index kind or"
                  " another sharding is rebuilt without the images or the encoder; the ledger holds every sample's"
                  " row and keys."]
    if "erase_floor_s" in v:
        copies = v["forget_copies"]
        lines += ["", f"The floor under the forget call on this disk: zeroing {r['delete_vectors']:,} vectors in place at"
                  f" random places in {len(copies)} files the size of the copies the forget reaches ("
                  + ", ".join(f"{k} {b / 1e9:.3g} GB" for k, b in copies.items()) +
                  f") and syncing them, with nothing else to do, took {_f(r['forget_floor_s'])} s; the call took"
                  f" {_f(r['forget_call_s'] / r['forget_floor_s'])} times that."]
        by_copies = v.get("erase_floor_by_copies_s", [])
        if len(by_copies) > 1:   # what a forget that reached fewer copies would wait for on this disk
            names = list(copies)
            lines[-1] += (" The same for fewer copies: " + ", ".join(
                f"{' and '.join(names[:j + 1])} {_f(t)} s" for j, t in enumerate(by_copies[:-1])) + ".")
    if v.get("forget_phases"):
        lines += ["", "vismem's forget call by phase (s, medians): " +
                  ", ".join(f"{step.replace('_', ' ')} {_f(t)}" for step, t in v["forget_phases"].items()) + "."]
    lance = systems.get("lancedb", {})
    if lance.get("delete_clean_by"):
        lines += ["", f"LanceDB's delete marks rows deleted: after `optimize` (no older version kept),"
                  f" {lance['deleted_vectors_left_after_optimize']:,} of the {r['delete_vectors']:,} deleted vectors"
                  f" still had bytes on disk; none after: {lance['delete_clean_by']}."]
    copies = systems.get("faiss", {}).get("deleted_vectors_that_are_centroids")
    if copies:
        lines += ["", f"Plain FAISS: after `remove_ids` and the file written again, {copies} deleted vector(s) are still"
                  " in it as IVF centroids: k-means makes a vector a centroid when its cluster holds it alone. vismem's"
                  " IVF training leaves no centroid a copy of one vector."]
    return "\n".join(lines + [end]) + "\n"


def write(r: dict, results: Path = RESULTS, peers_json: Path = PEERS_JSON) -> None:
    """The run into peers.json (one run kept per N) and its section into RESULTS.md (replacing the
    last run's at that N; the rest of the file as it was)."""
    runs = runs_of(peers_json)
    runs[str(r["n"])] = r
    peers_json.write_text(json.dumps(runs, indent=1) + "\n")
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    section, (begin, end) = render(r), markers(r["n"])
    if begin in text and end in text:
        text = text[:text.index(begin)] + section.rstrip("\n") + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


def runs_of(peers_json: Path = PEERS_JSON) -> dict[str, dict]:
    """The runs peers.json keeps, by N."""
    return json.loads(peers_json.read_text()) if peers_json.exists() else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    parser.add_argument("--json-to", type=Path, help="and write the JSON to this file")
    parser.add_argument("--no-write", action="store_true", help="leave benchmarks/RESULTS.md and peers.json as they are")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        data = Data(args.data)
        with contextlib.redirect_stdout(sys.stderr):  # progress lines must not break the result line
            out = WORKERS[args.worker](data, args.data / args.worker)
        print(json.dumps(out))
        return 0
    result = run(args.n, args.d)
    if not args.no_write:
        write(result)
    if args.json_to:
        args.json_to.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
