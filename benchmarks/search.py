"""Exact search against the machine's float32 GEMM rate, against FAISS flat, and classify against
bare search, all measured in the same run.

    python -m benchmarks.search [--n 1000000] [--d 384] [--k 50] [--quick] [--json]
                                [--no-classify] [--faiss-crossover] [--kernels]

* `gemm_gflops`: a 4096 x 4096 x 4096 float32 numpy matmul (median of the repeats), the
  machine's rate, measured between the search repeats so both see the same load;
* `search_gflops`: vismem's exact top-k (vismem_assets/search.py), k = 50, 1,000 queries,
  2 * n_queries * N * d flops over its wall time; `search_ratio` = search_gflops / gemm_gflops;
  `own_gemm_gflops`: the same blocks of matmul without the top-k selection (what selection costs);
* FAISS flat (IndexIDMap2(IndexFlatIP), the memory's own live index) on the same vectors and
  queries, batches of 1, 10, 100 and 1,000: with the settings vismem gives it (blas.py) and with
  faiss's defaults (BLAS only from queries x d = 128,000, sgemm blocks of 1,024 vectors);
* classify (search + catalog + vote, everything but the encoder: a stand-in encoder hands over
  the query vectors) against bare `Memory.search` on the same memory and queries.

The memory is synthetic (benchmarks/synthetic.py): N vectors = one of 100 Gaussian cluster
centres + noise 0.6 per coordinate, L2-normalised, its cluster as label, stored as a real memory
(ledger, embedding files, live flat index). Queries are fresh draws around the same centres:
held out, and close to the memory the way a real query is.

--faiss-crossover: FAISS flat's SIMD scan against its BLAS path for 1-256 queries (how
blas.FAISS_BLAS_THRESHOLD was chosen). --kernels: numpy GEMM and FAISS flat under each
OPENBLAS_CORETYPE, each in a fresh process (the variable only counts before OpenBLAS loads).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vismem_assets  # noqa: F401  (first: its BLAS set-up must precede numpy's and faiss's OpenBLAS)

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from vismem_assets.blas import FAISS_BLAS_THRESHOLD, blas_report
from vismem_assets.index_types import IndexPolicy
from vismem_assets.search import block_rows, flat_searcher, topk_inner_product

from .synthetic import QueryVectors, build_memory

GEMM_SIZE = 4096
BATCHES = (1, 10, 100, 1000)
FAISS_DEFAULTS = {"distance_compute_blas_threshold": 128_000, "distance_compute_blas_database_bs": 1024,
                  "distance_compute_blas_query_bs": 4096}


def held_out_queries(n: int, d: int, seed: int = 0, n_clusters: int = 100, noise: float = 0.6,
                     query_seed: int = 12345) -> np.ndarray:
    """Fresh vectors around the centres of `clustered_vectors(..., n_clusters, noise, seed)`
    (its first draw is the centres, whatever its n)."""
    centres = np.random.default_rng(seed).standard_normal((n_clusters, d)).astype(np.float32)
    rng = np.random.default_rng(query_seed)
    x = centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class FaissSettings:
    """Temporarily apply faiss cvar settings."""

    def __init__(self, **values):
        self.values = values

    def __enter__(self):
        self.saved = {k: getattr(faiss.cvar, k) for k in self.values}
        for k, v in self.values.items():
            setattr(faiss.cvar, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(faiss.cvar, k, v)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each fn, the fns taking turns so that all see the same load."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def own_gemm(vectors: np.ndarray, queries: np.ndarray):
    """The matmul blocks of topk_inner_product, without the selection."""
    rows = block_rows(len(vectors), len(queries))
    buf = np.empty(rows * len(queries), np.float32)

    def run():
        for start in range(0, len(vectors), rows):
            w = min(rows, len(vectors) - start)
            np.matmul(vectors[start:start + w], queries.T, out=buf[: w * len(queries)].reshape(w, len(queries)))
    return run


def run(n: int | None = None, d: int = 384, k: int = 50, n_queries: int = 1000, quick: bool = False,
        classify: bool = True, repeats: int | None = None) -> dict:
    n = n or (100_000 if quick else 1_000_000)
    repeats = repeats or 3
    gemm_a = np.random.default_rng(0).standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
    gemm_flops = 2 * GEMM_SIZE ** 3
    queries = held_out_queries(max(BATCHES + (n_queries,)), d)
    with tempfile.TemporaryDirectory(prefix="vismem-bench-search-") as tmp:
        encoder = QueryVectors(d)
        with contextlib.redirect_stdout(sys.stderr):  # its progress line must not break --json
            memory = build_memory(Path(tmp) / "home", n, encoder, index_policy=IndexPolicy(kind="flat"))
        _, index = memory.live_index()
        searcher = flat_searcher(index)  # a view of the live index's vectors
        vectors = searcher.vectors
        result = {"n": n, "d": d, "k": k, "n_queries": n_queries, "threads": faiss.omp_get_max_threads(),
                  "repeats": repeats, "gemm_size": GEMM_SIZE,
                  "data": "synthetic clustered (100 centres, noise 0.6, L2-normalised); held-out queries "
                          "around the same centres"}

        # -- the headline: GEMM rate, our search at n_queries, the same matmul blocks bare --------
        q = queries[:n_queries]
        t = _interleaved({"gemm": lambda: gemm_a @ gemm_a,
                          "search": lambda: topk_inner_product(vectors, q, k),
                          "own_gemm": own_gemm(vectors, q)}, repeats)
        flops = 2 * n_queries * n * d
        result["gemm_gflops"] = round(gemm_flops / t["gemm"] / 1e9, 1)
        result["search_gflops"] = round(flops / t["search"] / 1e9, 1)
        result["search_ratio"] = round(result["search_gflops"] / result["gemm_gflops"], 3)
        result["own_gemm_gflops"] = round(flops / t["own_gemm"] / 1e9, 1)
        result["selection_share"] = round(1 - t["own_gemm"] / t["search"], 3)
        print(f"GEMM {result['gemm_gflops']} GFLOP/s; search {result['search_gflops']} GFLOP/s "
              f"(ratio {result['search_ratio']})", file=sys.stderr, flush=True)

        # -- against FAISS flat, batch by batch -----------------------------------------------------
        result["batches"] = []
        for nb in BATCHES:
            qb = queries[:nb]
            reps = repeats if nb >= 100 else max(repeats, 5)
            fns = {"ours": lambda: searcher.search(qb, k), "faiss": lambda: index.search(qb, k)}

            def faiss_default():
                with FaissSettings(**FAISS_DEFAULTS):
                    index.search(qb, k)
            fns["faiss_default"] = faiss_default
            tb = _interleaved(fns, reps)
            fl = 2 * nb * n * d
            row = {"batch": nb}
            for name, sec in tb.items():
                row[f"{name}_qps"] = round(nb / sec, 2)
                row[f"{name}_gflops"] = round(fl / sec / 1e9, 2)
            row["speedup_vs_faiss"] = round(tb["faiss"] / tb["ours"], 2)
            row["speedup_vs_faiss_default"] = round(tb["faiss_default"] / tb["ours"], 2)
            result["batches"].append(row)
            print(f"batch {nb}: {row}", file=sys.stderr, flush=True)

        # -- classify (search + vote) against bare search ------------------------------------------
        if classify:
            # Synthetic samples have no image files; classify names each neighbour's path (never read).
            with memory.ledger.transaction() as con:
                con.execute("UPDATE samples SET image_path = 'images/synthetic/' || sample_id || '.png'"
                            " WHERE image_path IS NULL")
            encoder.queries = q
            images = list(range(n_queries))
            memory.classify(images[:10], k=k)  # warm: catalog, pruning mode, novelty not asked
            tc = _interleaved({"gemm": lambda: gemm_a @ gemm_a, "classify": lambda: memory.classify(images, k=k),
                               "search": lambda: memory.search(q, k)}, repeats)
            gemm_now = gemm_flops / tc["gemm"] / 1e9
            result["classify"] = {"queries": n_queries, "k": k, "classify_qps": round(n_queries / tc["classify"], 2),
                                  "search_qps": round(n_queries / tc["search"], 2),
                                  "ratio": round(tc["search"] / tc["classify"], 3),
                                  "classify_gflops": round(flops / tc["classify"] / 1e9, 1),
                                  "gemm_gflops": round(gemm_now, 1),
                                  "classify_ratio_to_gemm": round(flops / tc["classify"] / 1e9 / gemm_now, 3)}
        result["faiss_settings"] = {k_: getattr(faiss.cvar, k_) for k_ in FAISS_DEFAULTS}
        result["blas"] = blas_report()
    return result


def faiss_crossover(n: int = 100_000, d: int = 384, k: int = 50, repeats: int = 7) -> list[dict]:
    """FAISS flat's SIMD scan against its BLAS path (with vismem's block sizes) for small batches."""
    x = held_out_queries(n, d, query_seed=1)
    q = held_out_queries(256, d, query_seed=2)
    index = faiss.IndexFlatIP(d)
    index.add(x)
    rows = []
    for nb in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        def path(threshold):
            def f():
                with FaissSettings(distance_compute_blas_threshold=threshold):
                    index.search(q[:nb], k)
            return f
        t = _interleaved({"simd": path(2**31 - 1), "blas": path(0), "vismem": lambda: topk_inner_product(x, q[:nb], k)},
                         repeats)
        rows.append({"batch": nb, "queries_x_d": nb * d, "simd_qps": round(nb / t["simd"], 1),
                     "blas_qps": round(nb / t["blas"], 1), "vismem_qps": round(nb / t["vismem"], 1),
                     "blas_over_simd": round(t["simd"] / t["blas"], 2)})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


_KERNEL_PROBE = """
import json, statistics, time, numpy as np, faiss
n, d = {n}, {d}
a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
x = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
q = x[:1000].copy()
index = faiss.IndexFlatIP(d); index.add(x)
faiss.cvar.distance_compute_blas_threshold = 0
g, s = [], []
for _ in range({repeats}):
    t = time.perf_counter(); a @ a; g.append(time.perf_counter() - t)
    t = time.perf_counter(); index.search(q, 50); s.append(time.perf_counter() - t)
import vismem_assets.blas as b
print(json.dumps({{"gemm_gflops": 2 * 4096**3 / statistics.median(g) / 1e9,
                  "faiss_gflops": 2 * 1000 * n * d / statistics.median(s) / 1e9,
                  "libraries": b._openblas_libraries()}}))
"""


def kernels(n: int = 200_000, d: int = 384, repeats: int = 3) -> list[dict]:
    """numpy GEMM and FAISS flat (1,000 queries, BLAS path) under each OPENBLAS_CORETYPE, each in a
    fresh process with vismem's automatic choice off."""
    from vismem_assets.blas import best_kernel, missing_flags, read_cpu_flags

    flags = read_cpu_flags()
    rows = []
    for kernel in (None, "Prescott", "Sandybridge", "Haswell", "Zen", "SkylakeX", "Cooperlake"):
        if kernel is not None and missing_flags(kernel, flags):
            continue
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "VISMEM_OPENBLAS_CORETYPE")}
        env["VISMEM_BLAS_AUTO"] = "0"
        if kernel:
            env["OPENBLAS_CORETYPE"] = kernel
        out = subprocess.run([sys.executable, "-c", _KERNEL_PROBE.format(n=n, d=d, repeats=repeats)], env=env,
                             capture_output=True, text=True, check=True)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"OPENBLAS_CORETYPE": kernel or "(unset: OpenBLAS detects)",
                     "gemm_gflops": round(probe["gemm_gflops"], 1), "faiss_flat_gflops": round(probe["faiss_gflops"], 1),
                     "kernels_loaded": {lib["library"]: lib.get("kernel") for lib in probe["libraries"]}})
        print(rows[-1], file=sys.stderr, flush=True)
    return [{"cpu_best_kernel": best_kernel(flags)}, *rows]


def _print(result: dict) -> None:
    print(f"\nexact search, N = {result['n']:,}, d = {result['d']}, k = {result['k']}, {result['threads']} threads, "
          f"medians of {result['repeats']}+ repeats; {result['data']}")
    print(f"  float32 GEMM {result['gemm_size']}^3:        {result['gemm_gflops']:8.1f} GFLOP/s   (baseline)")
    print(f"  vismem search, {result['n_queries']} queries: {result['search_gflops']:8.1f} GFLOP/s   "
          f"= {result['search_ratio']:.3f} x GEMM (target >= 0.6)")
    print(f"  its matmul blocks alone:      {result['own_gemm_gflops']:8.1f} GFLOP/s   "
          f"(top-k selection: {100 * result['selection_share']:.1f}% of the search time)")
    print("\n  batch | vismem qps  GFLOP/s | faiss (vismem settings) qps  GFLOP/s | faiss (defaults) qps  GFLOP/s"
          " | speed-up vs faiss / defaults")
    for r in result["batches"]:
        print(f"  {r['batch']:5d} | {r['ours_qps']:10.1f} {r['ours_gflops']:8.1f} | {r['faiss_qps']:27.1f} "
              f"{r['faiss_gflops']:8.1f} | {r['faiss_default_qps']:20.1f} {r['faiss_default_gflops']:8.1f} | "
              f"{r['speedup_vs_faiss']:5.2f} x / {r['speedup_vs_faiss_default']:5.2f} x")
    if "classify" in result:
        c = result["classify"]
        print(f"\n  classify (search + vote), {c['queries']} queries: {c['classify_qps']:.1f} qps vs bare search "
              f"{c['search_qps']:.1f} qps = {c['ratio']:.3f}; {c['classify_gflops']} GFLOP/s = "
              f"{c['classify_ratio_to_gemm']:.3f} x GEMM ({c['gemm_gflops']} GFLOP/s, measured alongside)")
    b = result["blas"]
    print(f"\n  BLAS: OPENBLAS_CORETYPE={b['openblas_coretype']} ({b['reason']}; applied: {b['applied']}); "
          + ", ".join(f"{lib['library']} runs {lib.get('kernel')}" for lib in b["libraries"]))
    f = result["faiss_settings"]
    print(f"  faiss (vismem settings): BLAS from queries x d = {f['distance_compute_blas_threshold']}, blocks of "
          f"{f['distance_compute_blas_query_bs']} x {f['distance_compute_blas_database_bs']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="stored vectors (default 1,000,000; --quick 100,000)")
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="N = 100,000: well under a minute")
    parser.add_argument("--no-classify", dest="classify", action="store_false")
    parser.add_argument("--faiss-crossover", action="store_true", help="also FAISS SIMD vs BLAS for 1-256 queries")
    parser.add_argument("--kernels", action="store_true", help="also GEMM and FAISS under each OPENBLAS_CORETYPE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n, args.d, args.k, args.queries, args.quick, args.classify, args.repeats)
    if args.faiss_crossover:
        result["faiss_crossover"] = faiss_crossover(min(result["n"], 100_000), args.d, args.k)
        result["faiss_crossover_threshold_used"] = FAISS_BLAS_THRESHOLD
    if args.kernels:
        result["kernels"] = kernels(min(result["n"], 200_000), args.d)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    _print(result)
    for row in result.get("faiss_crossover", []):
        print(f"  faiss crossover: {row}")
    for row in result.get("kernels", []):
        print(f"  kernel: {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
