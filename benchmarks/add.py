"""Adding 1% to a memory of N vectors, against a full rebuild of N.

    python -m benchmarks.add [--n 100000] [--d 1280] [--types flat ...] [--json]

Adding writes the new embeddings as a delta file beside the live version's files (the version
is the parent's files plus that one); a rebuild reads every embedding file and writes a new
base. Both measured here, in the same process, on the same memory. Past the policy's delta
share (10% of the base) an add folds instead: base, deltas and new vectors into a new base.
That add is measured too (`fold_seconds`), and the cost per add amortised over adding 1% at
a time until the fold (`amortised_ratio`).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import faiss

from vismem_assets.index_types import KINDS, IndexPolicy

from .synthetic import bench_encoder, build_memory, clustered_vectors, insert_vectors


def run(n: int, d: int = 1280, fraction: float = 0.01, repeats: int = 3, kinds=("flat",)) -> dict:
    """`kinds`: index types measured one after another on the same memory (the first is the
    headline figure; IVF-PQ is measured with its recall floor lowered, to show what a
    compressed version file costs)."""
    encoder = bench_encoder(d)
    with tempfile.TemporaryDirectory(prefix="vismem-bench-") as tmp:
        memory = build_memory(Path(tmp) / "home", n, encoder, index_policy=IndexPolicy(kind=kinds[0]))
        m = max(1, int(n * fraction))
        out = {"n": n, "d": encoder.dim, "added": m, "threads": faiss.omp_get_max_threads(), "types": {}}
        for kind in kinds:
            memory.indexes.policy = IndexPolicy(kind=kind, recall_floor=0.05 if kind == "ivf-pq" else 0.95)
            rebuilds, adds = [], []
            for r in range(repeats if kind == kinds[0] else 1):
                t0 = time.perf_counter()
                built = memory.rebuild()
                rebuilds.append(time.perf_counter() - t0)
                vectors, labels = clustered_vectors(m, encoder.dim, seed=1000 + len(out["types"]) * 10 + r)
                insert_vectors(memory, vectors, labels, f"added-{kind}-{r}")  # ingest + embed stand-in: not timed
                t0 = time.perf_counter()
                memory.index_pending()
                adds.append(time.perf_counter() - t0)
                memory.indexes.retain(2)
            rebuild, add = statistics.median(rebuilds), statistics.median(adds)
            fold = _fold_seconds(memory, m, kind, seed=2000 + len(out["types"]))
            per_fold = int(memory.indexes.policy.delta_fraction * n // m)  # delta adds before one folds
            out["types"][kind] = {"index_type": built.index_type, "recall_at_10": built.recall_at_10,
                                  "file_mib": round(sum(memory.layout.absolute(f.path).stat().st_size
                                                        for f in built.files) / 2**20, 1),
                                  "files": len(built.files),
                                  "rebuild_seconds": round(rebuild, 4), "add_seconds": round(add, 4),
                                  "add_ratio": round(add / rebuild, 4), "fold_seconds": round(fold, 4),
                                  "adds_per_fold": per_fold + 1,
                                  "amortised_ratio": round((per_fold * add + fold) / (per_fold + 1) / rebuild, 4)}
        out.update({k: out["types"][kinds[0]][k] for k in ("index_type", "rebuild_seconds", "add_seconds", "add_ratio")})
        return out


def _fold_seconds(memory, m: int, kind: str, seed: int) -> float:
    """An add of m vectors that folds (the policy's delta share set to 0): what every add cost
    before delta files, and what one add in `adds_per_fold` still costs."""
    policy = memory.indexes.policy
    vectors, labels = clustered_vectors(m, memory.encoder.dim, seed=seed)
    insert_vectors(memory, vectors, labels, f"fold-{kind}")
    memory.indexes.policy = IndexPolicy(**{**asdict(policy), "delta_fraction": 0.0})
    t0 = time.perf_counter()
    memory.index_pending()
    seconds = time.perf_counter() - t0
    memory.indexes.policy = policy
    memory.indexes.retain(2)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--types", nargs="+", default=["flat"], choices=KINDS[1:])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n, args.d, kinds=tuple(args.types))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\nN = {result['n']}, d = {result['d']}, {result['threads']} threads")
        for kind, t in result["types"].items():
            print(f"{kind} ({t['index_type']}, {t['file_mib']} MiB in {t['files']} file(s)): full rebuild "
                  f"{t['rebuild_seconds']:.3f} s; add {result['added']} (1%): {t['add_seconds']:.3f} s = "
                  f"{t['add_ratio']:.3f} x rebuild; an add that folds {t['fold_seconds']:.3f} s; amortised over "
                  f"{t['adds_per_fold']} adds {t['amortised_ratio']:.3f} x rebuild")
    return 0


if __name__ == "__main__":
    sys.exit(main())
