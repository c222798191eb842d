"""Adding 1% to a memory of N vectors, against a full rebuild of N.

    python -m benchmarks.add [--n 100000] [--json]

Adding folds the new embeddings into a new index version (the live version plus the new
vectors, written whole as a new immutable file); a rebuild reads every embedding file and
writes one version. Both measured here, in the same process, on the same memory.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss

from vismem_assets.encoders import load_encoder

from .synthetic import build_memory, clustered_vectors, insert_vectors


def run(n: int, fraction: float = 0.01, repeats: int = 3) -> dict:
    encoder = load_encoder("efficientnet-lite0")  # its id and dimension; the model is never loaded
    with tempfile.TemporaryDirectory(prefix="vismem-bench-") as tmp:
        memory = build_memory(Path(tmp) / "home", n, encoder)
        rebuilds, adds = [], []
        m = max(1, int(n * fraction))
        for r in range(repeats):
            t0 = time.perf_counter()
            memory.rebuild()
            rebuilds.append(time.perf_counter() - t0)
            vectors, labels = clustered_vectors(m, encoder.dim, seed=1000 + r)
            insert_vectors(memory, vectors, labels, f"added-{r}")  # ingest + embed stand-in: not timed
            t0 = time.perf_counter()
            memory.index_pending()
            adds.append(time.perf_counter() - t0)
            memory.indexes.retain(2)
        rebuild, add = statistics.median(rebuilds), statistics.median(adds)
        return {"n": n, "d": encoder.dim, "added": m, "threads": faiss.omp_get_max_threads(),
                "rebuild_seconds": round(rebuild, 4), "add_seconds": round(add, 4), "add_ratio": round(add / rebuild, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\nN = {result['n']}, d = {result['d']}, {result['threads']} threads")
        print(f"full rebuild: {result['rebuild_seconds']:.3f} s; add {result['added']} (1%): "
              f"{result['add_seconds']:.3f} s = {result['add_ratio']:.3f} x rebuild (medians of 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
