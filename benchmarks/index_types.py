"""Index types: recall@10 and recall@100 against exact search, and speed-up, for each type offered.

    python -m benchmarks.index_types [--n 1000000] [--d 384] [--json]

Vectors: benchmarks/synthetic.py's clustered vectors (100 cluster centres, Gaussian noise,
unit length); 1,000 held-out queries drawn from the same clusters and never stored. The
baseline is vismem's exact search (search.py) on the same vectors and queries, k = 100,
in the same process. Each IVF index is trained as a build trains it (index_types.py: about
2 sqrt(N) lists, 48 training vectors per list, drawn as a build draws them); the curve doubles
nprobe from 1, and the operating point is the nprobe a build would store: `choose_nprobe`, the
smallest whose recall@10 on 1,000 held-out stored vectors reaches the floor (0.95), found by
doubling then bisecting. Its recall and speed are measured on the benchmark's own queries
(never stored), and so may differ a little from the build's figure. There, speed-ups are also
measured for 1, 10, 100 and 1,000 queries a call: exact search amortises its pass over the memory across a batch, FAISS's IVF
search does not (it scans query by query); vismem's list-batched IVF-Flat search
(vismem_assets/ivf_search.py, `IVFSearcher`: each probed list read once for all the queries of
the call probing it) is timed beside FAISS's `index.search` (the same results).

Summary keys, for what vismem uses: `ivf_type` is the IVF kind vismem's default policy builds
(`IndexPolicy().wanted` at scale: IVF-Flat) when it passes the floor, `ivf_speedup` its speed-up
over exact at 1,000 queries a call searched by `IVFSearcher` (`ivf_search.ivf_searcher`, vismem's
searcher for IVF-Flat: the list-batched path; FAISS for the other kinds), `ivf_faiss_speedup` the
same by FAISS's `index.search`. `ivf_fastest_type` / `ivf_fastest_speedup`: the fastest passing type by FAISS's
search at the operating point (what `ivf_type` / `ivf_speedup` meant before);
`ivf_flat_speedup`: IVF-Flat's speed-up at the operating point by FAISS's search, as before.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import vismem_assets  # noqa: F401  (first: its BLAS set-up)
import faiss  # noqa: E402
import numpy as np  # noqa: E402

from vismem_assets.index_kinds import BuildReport, kind_named  # noqa: E402
from vismem_assets.index_kinds.ivf import (choose_nprobe, fill, held_out_and_training, nlist_for, recall,  # noqa: E402
                                           train_ivf)
from vismem_assets.index_types import IndexPolicy  # noqa: E402
from vismem_assets.ivf_search import IVFSearcher  # noqa: E402
from vismem_assets.search import topk_inner_product  # noqa: E402

from .synthetic import clustered_vectors  # noqa: E402

FLOOR = 0.95
K = 100


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(n: int, d: int, n_queries: int = 1000, repeats: int = 3, kinds=("ivf-flat", "ivf-sq8", "ivf-pq")) -> dict:
    x, _ = clustered_vectors(n + n_queries, d, seed=0)
    x, queries = x[:n], np.ascontiguousarray(x[n:])
    ids = np.arange(n, dtype=np.int64)
    exact_seconds, (_, truth) = _timed(lambda: topk_inner_product(x, queries, K), repeats)
    result = {"n": n, "d": d, "queries": n_queries, "k": K, "threads": faiss.omp_get_max_threads(),
              "exact_seconds": round(exact_seconds, 4), "exact_qps": round(n_queries / exact_seconds, 1), "types": {}}
    nlist = nlist_for(n)
    for kind in kinds:
        held_out, train_at = held_out_and_training(n, kind, nlist)  # as a build draws them
        t0 = time.perf_counter()
        index = train_ivf(kind, x[np.sort(train_at)], nlist)
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        fill(index, ids, x)
        add_seconds = time.perf_counter() - t0
        curve, nprobe = [], 1
        while nprobe <= nlist // 4:
            index.nprobe = nprobe
            seconds, (_, found) = _timed(lambda: index.search(queries, K), repeats)
            curve.append({"nprobe": nprobe, "recall_at_10": round(recall(found[:, :10], truth[:, :10]), 4),
                          "recall_at_100": round(recall(found, truth), 4), "qps": round(n_queries / seconds, 1),
                          "speedup": round(exact_seconds / seconds, 2)})
            if curve[-1]["recall_at_10"] >= max(FLOOR, 0.995):  # past the floor: enough of the curve
                break
            nprobe *= 2
        # The operating point: the nprobe a build stores, chosen on held-out stored vectors; its
        # recall and speed measured here on the benchmark's queries.
        report = BuildReport(kind, kind_named(kind).describe(index), "", kind)
        choose_nprobe(index, ids, x, held_out, FLOOR, report)
        point = None
        if report.kind != "flat":
            index.nprobe = report.nprobe
            seconds, (_, found) = _timed(lambda: index.search(queries, K), repeats)
            point = {"nprobe": report.nprobe, "recall_at_10": round(recall(found[:, :10], truth[:, :10]), 4),
                     "recall_at_100": round(recall(found, truth), 4), "qps": round(n_queries / seconds, 1),
                     "speedup": round(exact_seconds / seconds, 2), "build_recall_at_10": report.recall_at_10,
                     "build_sweep": report.sweep}
        by_batch = _by_batch(index, x, queries, point["nprobe"], repeats) if point else []
        result["types"][kind] = {
            "factory": kind_named(kind).describe(index),
            "nlist": nlist, "n_train": len(train_at), "train_seconds": round(train_seconds, 2),
            "add_seconds": round(add_seconds, 2), "bytes_per_vector": round(_bytes(index) / n, 1),
            "curve": curve, "operating_point": point, "by_batch": by_batch,
            "verdict": (f"used: nprobe {point['nprobe']}, the build's choice (recall@10 {point['build_recall_at_10']}"
                        f" on {len(held_out):,} held-out stored vectors); on the benchmark's queries recall@10 "
                        f"{point['recall_at_10']}, {point['speedup']}x exact"
                        if point else f"refused, the memory stays exact: {report.reason.removeprefix('exact: ')}")}
        del index
    passing = {k: t["operating_point"] for k, t in result["types"].items() if t["operating_point"]}
    fastest = max(passing, key=lambda k: passing[k]["speedup"], default=None)
    policy = IndexPolicy()
    used = policy.wanted(max(n, policy.ivf_from))  # the IVF kind a default build makes at scale
    used = used if used in passing else None  # (refused by the floor: the memory stays exact)
    at_1000 = next((b for b in result["types"][used]["by_batch"] if b["batch"] == 1000), {}) if used else {}
    result["ivf_type"] = used
    result["ivf_recall_at_10"] = passing[used]["recall_at_10"] if used else None
    result["ivf_recall_at_100"] = passing[used]["recall_at_100"] if used else None
    result["ivf_speedup"] = at_1000.get("lists_speedup") or at_1000.get("speedup")  # as vismem searches it
    result["ivf_faiss_speedup"] = at_1000.get("speedup")
    result["ivf_fastest_type"] = fastest
    result["ivf_fastest_speedup"] = passing[fastest]["speedup"] if fastest else None
    result["ivf_flat_speedup"] = passing.get("ivf-flat", {}).get("speedup")
    return result


BATCHES = ((1, 20), (10, 100), (100, 1000), (1000, 1000))  # (queries per call, queries timed)


def _by_batch(index, x, queries, nprobe: int, repeats: int) -> list[dict]:
    """Speed-up at the operating point for single queries and small batches too: exact search
    amortises its pass over the memory across a batch, FAISS's IVF search does not, so the ratio
    depends on it. `ivf_qps`: FAISS's `index.search`; `lists_qps`: `IVFSearcher`, `lists_path` saying
    whether it took its list-batched path or, below its crossover, `index.search` too (None for the
    types it leaves to FAISS). The three are timed in turn within each repeat (FAISS and
    IVFSearcher in alternating order, so that both see the same load and caches), median of the repeats.
    IVFSearcher's first list-batched call of the process (it loads the compiled kernel from numba's
    disk cache, and touches its scratch for the first time) is made before the repeats and
    reported apart, as `lists_first_call_seconds`."""
    index.nprobe = nprobe
    searcher = IVFSearcher(index)
    rows = []
    first_call = None
    if searcher.list_batched:  # the process's first list-batched call loads the compiled kernel: timed apart
        first_call = _timed(lambda: searcher.search(queries[:max(b for b, _ in BATCHES)], K), 1)[0]
    for batch, n_q in BATCHES:
        q = queries[:n_q]
        paths = {"exact": lambda b: topk_inner_product(x, b, K), "ivf": lambda b: index.search(b, K)}
        if searcher.list_batched:
            paths["lists"] = lambda b: searcher.search(b, K)
        times = {name: [] for name in paths}
        for r in range(repeats):
            names = list(paths) if r % 2 == 0 else ["exact", *list(paths)[:0:-1]]  # FAISS / lists: both orders
            for name in names:
                fn = paths[name]
                times[name].append(_timed(lambda: [fn(q[i:i + batch]) for i in range(0, n_q, batch)], 1)[0])
        exact, approx = statistics.median(times["exact"]), statistics.median(times["ivf"])
        lists = statistics.median(times["lists"]) if "lists" in times else None
        rows.append({"batch": batch, "exact_qps": round(n_q / exact, 1), "ivf_qps": round(n_q / approx, 1),
                     "speedup": round(exact / approx, 2),
                     "lists_qps": round(n_q / lists, 1) if lists else None,
                     "lists_speedup": round(exact / lists, 2) if lists else None,
                     "lists_path": ("list-batched" if searcher.lists_for(batch) else "FAISS") if lists else None,
                     "lists_first_call_seconds": round(first_call, 3) if first_call and searcher.lists_for(batch) else None})
    return rows


def _bytes(index) -> int:
    return len(faiss.serialize_index(index))


def _print(r: dict) -> None:
    print(f"\nN = {r['n']:,}, d = {r['d']}, {r['queries']} held-out queries, k = {r['k']}, {r['threads']} threads; "
          f"exact search: {r['exact_qps']} qps (baseline, same run)")
    for kind, t in r["types"].items():
        print(f"\n  {kind} ({t['factory']}, {t['bytes_per_vector']} bytes/vector): trained on {t['n_train']:,} in "
              f"{t['train_seconds']} s, {r['n']:,} added in {t['add_seconds']} s -> {t['verdict']}")
        print(f"  {'nprobe':>8}{'recall@10':>11}{'recall@100':>12}{'qps':>10}{'speed-up':>10}")
        point = t["operating_point"]
        rows = t["curve"] + ([point] if point and point["nprobe"] not in [c["nprobe"] for c in t["curve"]] else [])
        for c in sorted(rows, key=lambda c: c["nprobe"]):
            print(f"  {c['nprobe']:>8}{c['recall_at_10']:>11.4f}{c['recall_at_100']:>12.4f}{c['qps']:>10.1f}"
                  f"{c['speedup']:>10.2f}{'  <- used' if c is point or (point and c['nprobe'] == point['nprobe']) else ''}")
        for b in t["by_batch"]:
            lists = (f"; IVFSearcher ({b.get('lists_path')}) {b['lists_qps']} qps = {b['lists_speedup']}x"
                     if b.get("lists_qps") else "")
            print(f"  at nprobe {t['operating_point']['nprobe']}, {b['batch']:>4} queries a call: exact {b['exact_qps']} qps,"
                  f" FAISS IVF {b['ivf_qps']} qps = {b['speedup']}x{lists}")
    print(f"\n  vismem's IVF ({r['ivf_type']}, as it searches it): {r['ivf_speedup']}x exact at 1,000 queries a call"
          f" (FAISS's search: {r['ivf_faiss_speedup']}x); fastest type by FAISS's search: {r['ivf_fastest_type']}"
          f" ({r['ivf_fastest_speedup']}x)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n, args.d)
    print(json.dumps(result)) if args.json else _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
