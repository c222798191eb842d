"""Latency where users feel it (issue 20): a single query through `Memory.search` against its own
searchers, the first search after an add and after a forget, a forget call, and the disk a memory
takes against plain FAISS's file of the same vectors.

    python -m benchmarks.latency [--n 200000] [--d 384] [--json]

One synthetic memory of N clustered vectors (benchmarks/synthetic.py), exact index, in this
process. Medians of 3 where a figure repeats cheaply. The forget removes min(10,000, N / 20)
random samples, and `audit verify` then checks that none of their bytes is left anywhere.
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
from vismem_assets.index_kinds.flat import flat_index
from vismem_assets.index_types import IndexPolicy
from vismem_assets.shards import search_all

from .synthetic import bench_encoder, build_memory, clustered_vectors, insert_vectors

K = 10


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run(n: int = 200_000, d: int = 384, singles: int = 200) -> dict:
    encoder = bench_encoder(d)
    queries = clustered_vectors(singles, d, seed=99)[0]
    with tempfile.TemporaryDirectory(prefix="vismem-bench-latency-") as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # its progress line must not break --json
            memory = build_memory(Path(tmp) / "home", n, encoder, index_policy=IndexPolicy(kind="flat"))
        memory.search(queries[:1], K)
        searchers = memory.recall.live_files().searchers()
        bare = statistics.median(_seconds(lambda: [search_all(searchers, q[None], K) for q in queries]) for _ in range(3))
        full = statistics.median(_seconds(lambda: [memory.search(q[None], K) for q in queries]) for _ in range(3))

        extra = max(1, n // 100)
        vectors, labels = clustered_vectors(extra, d, seed=7)
        insert_vectors(memory, vectors, labels, prefix="added")
        add = _seconds(lambda: memory.index_pending(embed=False))
        after_add = _seconds(lambda: memory.search(queries[:1], K))
        add_switch = memory.recall.live_files().last

        size = min(10_000, n // 20)
        victims = memory.ledger.query(f"SELECT sample_id FROM samples ORDER BY random() LIMIT {size}")["sample_id"].to_list()
        report = memory.forget(ForgetRequest(requested_by="bench", reason="latency", sample_ids=victims))
        after_forget = _seconds(lambda: memory.search(queries[:1], K))
        forget_switch = memory.recall.live_files().last
        clean = memory.audit.verify().ok

        memory.indexes.retain(1)  # the live version only, as a peer holds one copy
        ids, stored = memory.stored_vectors()
        plain = Path(tmp) / "plain.faiss"
        faiss.write_index(flat_index(ids, stored), str(plain))
        home = memory.layout.root
        disk = {part: _disk(home / part) for part in ("embeddings", "indexes")}
        disk["ledger"] = memory.layout.ledger.stat().st_size
        disk["faiss_file"] = plain.stat().st_size
    return {"n": n, "d": d, "k": K,
            "single_query_ms": round(full / singles * 1e3, 3), "searcher_single_query_ms": round(bare / singles * 1e3, 3),
            "single_query_ratio": round(bare / full, 3),
            "add_vectors": extra, "add_index_s": round(add, 4), "switch_after_add_s": round(after_add, 4),
            "switch_after_add": vars(add_switch),
            "forget_samples": size, "forget_call_s": round(report.seconds, 4), "forget_phases": report.phases,
            "switch_after_forget_s": round(after_forget, 4), "switch_after_forget": vars(forget_switch),
            "no_forgotten_byte_left": clean,
            "disk_bytes": disk,
            "disk_ratio_to_faiss": round((disk["embeddings"] + disk["indexes"] + disk["ledger"]) / disk["faiss_file"], 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n, args.d)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"N = {result['n']:,}, d = {result['d']}, exact, k = {result['k']}")
    for key, value in result.items():
        if key not in ("n", "d", "k"):
            print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
