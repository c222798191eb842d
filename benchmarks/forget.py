"""Forgetting 1, 100 and 10,000 samples from a memory of N vectors, against a full rebuild.

    python -m benchmarks.forget [--n 100000] [--json]

Forgetting writes a new live version and rewrites, in it and in every retained version, each
index file (shard or delta) that held the samples, the embedding files that held them, and
the ledger file; a rebuild reads every embedding and writes one version. Both are measured
here, in the same process, on the same memory. Samples are drawn at random (scattered over
every file: the worst case), and for the first index type one whole image set is forgotten
too (its samples arrived together, so they sit in one embedding part and one or two shards).
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
from vismem_assets.index_types import KINDS, IndexPolicy

from .synthetic import build_memory


def timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(n: int, sizes=(1, 100, 10_000), retained: int = 1, kinds=("flat",)) -> dict:
    """`kinds`: index types measured one after another on the same memory (the first is the
    headline figure; each later one forgets only its largest size, from a fresh rebuild)."""
    encoder = load_encoder("efficientnet-lite0")  # its id and dimension; the model itself is never loaded
    with tempfile.TemporaryDirectory(prefix="vismem-bench-") as tmp:
        memory = build_memory(Path(tmp) / "home", n, encoder, index_policy=IndexPolicy(kind=kinds[0]))
        result = {"n": n, "d": encoder.dim, "threads": faiss.omp_get_max_threads(), "retained_versions": retained,
                  "types": {}}
        for kind in kinds:
            memory.indexes.policy = IndexPolicy(kind=kind, recall_floor=0.05 if kind == "ivf-pq" else 0.95)
            first = kind == kinds[0]
            rebuild = timed(lambda: memory.rebuild(), repeats=3 if first else 1)
            memory.indexes.retain(retained + 1)  # the live version plus `retained` older ones
            live = memory.indexes.live()
            row = {"index_type": live.index_type, "rebuild_seconds": round(rebuild, 4), "forget": []}
            if first:
                row["forget_set"] = _forget_set(memory, rebuild, retained)
            todo = sizes if first else sizes[-1:]
            victims = memory.ledger.query("SELECT sample_id FROM samples WHERE status = 'active' ORDER BY random()"
                                          f" LIMIT {sum(todo)}")["sample_id"].to_list()
            start = 0
            for size in todo:
                ids = victims[start:start + size]
                start += size
                request = ForgetRequest(requested_by="bench", reason=f"forget {size} ({kind})", sample_ids=ids)
                seconds = timed(lambda: memory.forget(request))
                memory.indexes.retain(retained + 1)
                row["forget"].append({"samples": size, "seconds": round(seconds, 4),
                                      "ratio_to_rebuild": round(seconds / rebuild, 3)})
            result["types"][kind] = row
        head = result["types"][kinds[0]]
        result.update(rebuild_seconds=head["rebuild_seconds"], forget=head["forget"], forget_set=head["forget_set"],
                      forget_ratio=head["forget"][-1]["ratio_to_rebuild"])
    return result


def _forget_set(memory, rebuild: float, retained: int) -> dict:
    name, n = memory.ledger.query("SELECT image_set, count(*) AS n FROM samples WHERE status = 'active'"
                                  " GROUP BY image_set ORDER BY image_set LIMIT 1").row(0)
    seconds = timed(lambda: memory.forget(ForgetRequest(requested_by="bench", reason="forget a set", image_set=name)))
    memory.indexes.retain(retained + 1)
    return {"image_set": name, "samples": n, "seconds": round(seconds, 4), "ratio_to_rebuild": round(seconds / rebuild, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--types", nargs="+", default=["flat"], choices=KINDS[1:])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n, sizes=tuple(s for s in (1, 100, 10_000) if s < args.n // 2), kinds=tuple(args.types))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\nN = {result['n']}, d = {result['d']}, {result['threads']} threads, "
          f"{result['retained_versions']} retained version(s) beside the live one")
    for kind, t in result["types"].items():
        print(f"{kind} ({t['index_type']}): full rebuild (ledger + embeddings -> new version) {t['rebuild_seconds']:.3f} s")
        for row in t["forget"]:
            print(f"  forget {row['samples']:>6} samples: {row['seconds']:.3f} s = {row['ratio_to_rebuild']:.3f} x rebuild")
        if "forget_set" in t:
            s = t["forget_set"]
            print(f"  forget image set {s['image_set']} ({s['samples']} samples): {s['seconds']:.3f} s = "
                  f"{s['ratio_to_rebuild']:.3f} x rebuild")
    return 0


if __name__ == "__main__":
    sys.exit(main())
