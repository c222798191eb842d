"""The benchmark suite: every figure next to its baseline, measured in the same run.

    vismem bench [--quick] [--json]        (or python -m benchmarks.suite)

| benchmark | figure | baseline (same run) |
| --- | --- | --- |
| embedding | images/s of the full path (decode, preprocess, encode, normalise, write) | the bare encoder forward |
| search | exact top-k GFLOP/s of classify's search | the machine's float32 GEMM rate |
| add | adding 1% to N vectors | a full rebuild of N |
| forget | forgetting 1, 100, 10,000 vectors | a full rebuild of N |
| index types | recall@10, recall@100 and speed-up of IVF-Flat and IVF-PQ per nprobe | exact search on the same queries |
| memory | peak RSS of a searching process above the imports | the index size on disk |

Vectors for the scale runs are synthetic but clustered like real embeddings (benchmarks/synthetic.py).
`--quick` runs the same code on small sizes in about a minute (CI runs it so it cannot rot).
"""
import argparse
import contextlib
import json
import sys
import time

import faiss

# Updates and memory run at N = 10^6, d = 384 (DINOv2-S), on IVF-Flat (what a memory that size
# gets) and exact; and at N = 10^5, d = 1280 (the default encoder), on every index type. The
# first configuration gives the headline figures.
UPDATES = ((1_000_000, 384, ("ivf-flat", "flat")), (100_000, 1280, ("flat", "ivf-flat", "ivf-sq8", "ivf-pq")))
QUICK = ((5_000, 1280, ("flat",)),)
SIZES = {  # (full, quick)
    "embedding": ({"n": 512}, {"n": 64}),
    "search": ({"n": 1_000_000, "d": 384}, {"n": 20_000, "d": 384}),
    "add": ({"configs": UPDATES}, {"configs": QUICK}),
    "forget": ({"configs": UPDATES}, {"configs": QUICK}),
    "index_types": ({"configs": ((1_000_000, 384), (100_000, 1280))}, {"configs": ((20_000, 384),)}),
    "memory": ({"configs": ((1_000_000, 384, ("ivf-flat", "flat")), (100_000, 1280, ("flat", "ivf-flat")))},
               {"configs": QUICK}),
}


def _run(name: str, quick: bool) -> dict:
    sizes = SIZES[name][quick]
    if name == "embedding":
        from .embedding import run
        return run(quick=quick, **sizes)
    if name == "search":
        from .search import run
        return run(quick=quick, **sizes)
    if name == "add":
        from .add import run
        runs = [run(n, d, repeats=1 if quick else 3, kinds=kinds) for n, d, kinds in sizes["configs"]]
    elif name == "forget":
        from .forget import run
        runs = [run(n, d, sizes=tuple(s for s in (1, 100, 10_000) if s <= n // 4), kinds=kinds)
                for n, d, kinds in sizes["configs"]]
    elif name == "index_types":
        from .index_types import run
        runs = [run(n, d, repeats=1 if quick else 3) for n, d in sizes["configs"]]
    else:
        from .memory import run
        runs = [run(n, d, kinds=kinds) for n, d, kinds in sizes["configs"]]
    return {**runs[0], "runs": runs}


def run(quick: bool = False, only: tuple[str, ...] = tuple(SIZES)) -> dict:
    results, seconds = {}, {}
    for name in only:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout is kept for the result (--json)
            results[name] = _run(name, quick)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"bench: {name} done in {seconds[name]} s", file=sys.stderr, flush=True)
    search, embedding = results.get("search", {}), results.get("embedding", {})
    return {
        "quick": quick, "threads": faiss.omp_get_max_threads(),
        "n": results.get("add", {}).get("n"), "d": results.get("add", {}).get("d"),
        "gemm_gflops": search.get("gemm_gflops"), "search_gflops": search.get("search_gflops"),
        "search_ratio": search.get("search_ratio"), "embed_ratio": embedding.get("embed_ratio"),
        "add_ratio": results.get("add", {}).get("add_ratio"),
        "forget_ratio": results.get("forget", {}).get("forget_ratio"),
        "forget_index_ratio": results.get("forget", {}).get("forget_index_ratio"),
        # The IVF type vismem builds (if it passed the floor), as vismem searches it; first configuration
        **{key: results.get("index_types", {}).get(key)
           for key in ("ivf_type", "ivf_recall_at_10", "ivf_recall_at_100", "ivf_speedup", "ivf_flat_speedup",
                       "ivf_faiss_speedup", "ivf_fastest_type", "ivf_fastest_speedup")},
        "ivf_n": results.get("index_types", {}).get("n"),
        "rss_over_index": results.get("memory", {}).get("rss_over_index"),
        "anon_over_index": results.get("memory", {}).get("anon_over_index"),
        "details": results, "seconds": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vismem bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="+", choices=tuple(SIZES), default=tuple(SIZES))
    args = parser.parse_args(argv)
    result = run(args.quick, tuple(args.only))
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    rows = [("search GFLOP/s / GEMM GFLOP/s", result["search_gflops"], result["gemm_gflops"], result["search_ratio"], ">= 0.6"),
            ("embedding full path / bare forward (img/s)", result["details"].get("embedding", {}).get("images_per_second_full"),
             result["details"].get("embedding", {}).get("images_per_second_bare"), result["embed_ratio"], ">= 0.85"),
            ("add 1% / rebuild (s)", result["details"].get("add", {}).get("add_seconds"),
             result["details"].get("add", {}).get("rebuild_seconds"), result["add_ratio"], "<= 0.05"),
            ("forget 10,000 / rebuild (s)", result["details"].get("forget", {}).get("forget_seconds"),
             result["details"].get("forget", {}).get("rebuild_seconds"), result["forget_ratio"], "<= 0.05"),
            ("  of which index files / rebuild", None, None, result["forget_index_ratio"], "<= 0.05"),
            (f"{result['ivf_type']} recall@10 (exact = 1)", result["ivf_recall_at_10"], 1.0, result["ivf_recall_at_10"], ">= 0.95"),
            (f"{result['ivf_type']} speed-up over exact (qps)", None, None, result["ivf_speedup"], ">= 20 at N = 10^6"),
            ("searching RSS above imports / index size", None, None, result["rss_over_index"], "mmap: < 1")]
    print(f"\nvismem bench{' --quick' if args.quick else ''}: {result['threads']} threads\n")
    print(f"{'figure':<46}{'measured':>12}{'baseline':>12}{'ratio':>10}  target")
    for name, measured, baseline, ratio, target in rows:
        fmt = lambda x: f"{x:>12.3f}" if isinstance(x, (int, float)) else f"{'-':>12}"  # noqa: E731
        print(f"{name:<46}{fmt(measured)}{fmt(baseline)}{fmt(ratio)[2:]:>10}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
