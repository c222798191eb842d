"""A memory in S shards against the same memory in one piece: search (scatter-gather in this
process), add and forget, as S grows.

    python -m benchmarks.shards [--n 200000] [--d 384] [--shards 1 2 4 8] [--json]

One synthetic memory of N clustered vectors (benchmarks/synthetic.py), exact (flat) index, is
re-sharded in turn into each S (`rebuild(n_shards=S)`: the same vectors, only the split changes).
For each S, in the same process, one after another:

* search: 1,000 held-out queries, k = 10, as one batch and one query at a time (200 of them);
  each shard's searcher answers its k best and `shards.merge_top_k` keeps the k best; the result
  is checked to equal S = 1's (ids and order);
* add: 1% of N new vectors (ledger rows and embedding parts written first, untimed), then the
  index step (`index_pending`): each shard gets its part as a delta file;
* forget 1, 100 and 10,000 random samples: the whole request, its phases, and how many index
  files it re-hashed (the shards it touched: with more shards, a forget of few samples re-hashes
  less). Ratios are to the rebuild of that S.

Figures are seconds and ratios to S = 1 measured in the same run (the machine is shared: read
the ratios).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from vismem_assets.forgetting import ForgetRequest
from vismem_assets.index_types import IndexPolicy
from vismem_assets.shards import search_all

from .synthetic import bench_encoder, build_memory, clustered_vectors, insert_vectors

K = 10


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def same_as_one_piece(memory, queries: np.ndarray) -> bool:
    """Whether the memory's search gives what one exact FAISS index over every stored vector gives:
    the same ids in the same order, up to ties (where two neighbours' similarities differ by less
    than float32's rounding, either order is right)."""
    ids, vectors = memory.stored_vectors()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    ref_sims, ref_pos = flat.search(queries, K)
    sims, found = memory.search(queries, K)
    return bool(np.all((found == ids[ref_pos]) | (np.abs(sims - ref_sims) < 1e-5)))


def run(n: int = 200_000, d: int = 384, shard_counts=(1, 2, 4, 8), forget_sizes=(1, 100, 10_000),
        singles: int = 200) -> dict:
    encoder = bench_encoder(d)
    queries = clustered_vectors(1000, d, seed=99)[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vismem-bench-shards-") as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # its progress line must not break --json
            memory = build_memory(Path(tmp) / "home", n, encoder, index_policy=IndexPolicy(kind="flat"))
        for step, n_shards in enumerate(shard_counts):
            t0 = time.perf_counter()
            live = memory.rebuild(n_shards=n_shards)
            rebuild = time.perf_counter() - t0
            memory.indexes.retain(1)
            memory.search(queries[:1], K)  # load the shards
            batch = _median_time(lambda: memory.search(queries, K))
            t0 = time.perf_counter()
            for q in queries[:singles]:
                memory.search(q[None], K)
            single = (time.perf_counter() - t0) / singles
            same = same_as_one_piece(memory, queries)
            # the searchers alone (no live-version check in the ledger: issue 20's fixed cost)
            _, index = memory.live_index()
            searchers = memory.recall._searchers(index)
            bare_batch = _median_time(lambda: search_all(searchers, queries, K))
            t0 = time.perf_counter()
            for q in queries[:singles]:
                search_all(searchers, q[None], K)
            bare_single = (time.perf_counter() - t0) / singles
            # add 1% as new samples
            extra = max(1, n // 100)
            vectors, labels = clustered_vectors(extra, d, seed=1000 + step)
            insert_vectors(memory, vectors, labels, prefix=f"add-{n_shards}")
            t0 = time.perf_counter()
            added = memory.index_pending(embed=False)
            add = time.perf_counter() - t0
            forgets = []
            victims = memory.ledger.query("SELECT sample_id FROM samples WHERE status = 'active' ORDER BY random()"
                                          f" LIMIT {sum(forget_sizes)}")["sample_id"].to_list()
            start = 0
            for size in forget_sizes:
                ids = victims[start:start + size]
                start += size
                before = memory.indexes.live()
                report = memory.forget(ForgetRequest(requested_by="bench", reason=f"forget {size} of S={n_shards}",
                                                     sample_ids=ids))
                after = memory.indexes.live()
                rehashed = sum(a.sha256 != b.sha256 for a, b in zip(after.files, before.files))
                forgets.append({"samples": size, "seconds": round(report.seconds, 4),
                                "ratio_to_rebuild": round(report.seconds / rebuild, 4),
                                "files_rehashed": int(rehashed), "files": len(after.files),
                                "phases": report.phases})
                memory.indexes.retain(1)
            rows.append({"shards": n_shards, "rebuild_seconds": round(rebuild, 3),
                         "search_batch_1000_qps": round(len(queries) / batch, 1), "search_single_ms": round(single * 1e3, 3),
                         "searchers_batch_1000_qps": round(len(queries) / bare_batch, 1),
                         "searchers_single_ms": round(bare_single * 1e3, 3),
                         "equal_to_one_piece": same, "add_vectors": extra, "add_seconds": round(add, 4),
                         "add_files_written": len(added.files) - len(live.files) if added else 0,
                         "forget": forgets})
    base = rows[0]
    for row in rows:
        row["batch_ratio_to_one"] = round(row["searchers_batch_1000_qps"] / base["searchers_batch_1000_qps"], 3)
        row["single_ratio_to_one"] = round(base["searchers_single_ms"] / row["searchers_single_ms"], 3)
        row["add_ratio_to_one"] = round(row["add_seconds"] / base["add_seconds"], 3)
    return {"n": n, "d": d, "k": K, "index_type": "IDMap2,Flat", "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"N = {result['n']:,}, d = {result['d']}, k = {result['k']}, exact; scatter-gather in one process.", "",
             "| S | rebuild s | searchers: batch 1,000 qps (× S=1) | searchers: 1 query ms (× S=1 speed) |"
             " Memory.search: batch 1,000 qps / 1 query ms | equal to one piece | add 1% s (× S=1) |"
             " forget 1 s | forget 100 s | forget 10,000 s (× rebuild) | files re-hashed (1 / 100 / 10,000) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = {x["samples"]: x for x in r["forget"]}
        big = f.get(10_000) or r["forget"][-1]
        lines.append(
            f"| {r['shards']} | {r['rebuild_seconds']} | {r['searchers_batch_1000_qps']} ({r['batch_ratio_to_one']}) | "
            f"{r['searchers_single_ms']} ({r['single_ratio_to_one']}) | {r['search_batch_1000_qps']} / "
            f"{r['search_single_ms']} | {'yes' if r['equal_to_one_piece'] else 'NO'} | "
            f"{r['add_seconds']} ({r['add_ratio_to_one']}) | {f[1]['seconds'] if 1 in f else '-'} | "
            f"{f[100]['seconds'] if 100 in f else '-'} | {big['seconds']} ({big['ratio_to_rebuild']}) | "
            + " / ".join(f"{x['files_rehashed']} of {x['files']}" for x in r["forget"]) + " |")
    one = next((x for x in result["rows"][0]["forget"] if x["samples"] == 1), None)
    if one:
        lines += ["", "Forgetting 1 sample at S = 1, by phase (s): "
                  + ", ".join(f"{k} {v}" for k, v in one["phases"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = tuple(s for s in (1, 100, 10_000) if s <= args.n // 20)
    result = run(args.n, args.d, tuple(args.shards), sizes)
    print(json.dumps(result) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
