"""Forgetting 1, 100 and 10,000 samples from a memory of N vectors, against a full rebuild.

    python -m benchmarks.forget [--n 100000] [--json]

Forgetting writes a new live version and rewrites every retained version, the embedding
files that held the samples, and the ledger file; a rebuild reads every embedding and writes
one version. Both are measured here, in the same process, on the same memory.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss

from vismem_assets.encoders import load_encoder
from vismem_assets.forgetting import ForgetRequest

from .synthetic import build_memory


def timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(n: int, sizes=(1, 100, 10_000), retained: int = 1) -> dict:
    encoder = load_encoder("efficientnet-lite0")  # its id and dimension; the model itself is never loaded
    with tempfile.TemporaryDirectory(prefix="vismem-bench-") as tmp:
        memory = build_memory(Path(tmp) / "home", n, encoder)
        rebuild = timed(lambda: memory.rebuild(), repeats=3)
        memory.indexes.retain(retained + 1)  # the live version plus `retained` older ones
        result = {"n": n, "d": encoder.dim, "threads": faiss.omp_get_max_threads(), "retained_versions": retained,
                  "rebuild_seconds": round(rebuild, 4), "forget": []}
        victims = memory.ledger.query("SELECT sample_id FROM samples WHERE status = 'active' ORDER BY random()"
                                      f" LIMIT {sum(sizes)}")["sample_id"].to_list()
        start = 0
        for size in sizes:
            ids = victims[start:start + size]
            start += size
            request = ForgetRequest(requested_by="bench", reason=f"forget {size}", sample_ids=ids)
            seconds = timed(lambda: memory.forget(request))
            memory.indexes.retain(retained + 1)
            result["forget"].append({"samples": size, "seconds": round(seconds, 4),
                                     "ratio_to_rebuild": round(seconds / rebuild, 3)})
        result["forget_ratio"] = result["forget"][-1]["ratio_to_rebuild"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n, sizes=tuple(s for s in (1, 100, 10_000) if s < args.n // 2))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\nN = {result['n']}, d = {result['d']}, {result['threads']} threads, "
          f"{result['retained_versions']} retained version(s) beside the live one")
    print(f"full rebuild (ledger + embeddings -> new version): {result['rebuild_seconds']:.3f} s (median of 3)")
    for row in result["forget"]:
        print(f"forget {row['samples']:>6} samples: {row['seconds']:.3f} s = {row['ratio_to_rebuild']:.3f} x rebuild")
    return 0


if __name__ == "__main__":
    sys.exit(main())
