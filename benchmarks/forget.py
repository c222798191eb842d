"""Forgetting 1, 100 and 10,000 samples from a memory of N vectors, against a full rebuild.

    python -m benchmarks.forget [--n 100000] [--d 1280] [--types flat ...] [--shards S] [--json]

Forgetting erases in place (vismem_assets/erasure.py): in every index file of every kept
version that holds a forgotten vector, and in every embedding part, the vector's bytes and id
are overwritten where they are; each touched index file is hashed anew (its sha256 goes into
the ledger before a byte changes); images are deleted; the proof is chained; and the ledger file
is rewritten (DuckDB keeps the old bytes of the redacted file names). A rebuild reads every
embedding file and writes one version. Both are measured here, in the same process, on the same
memory, and each forget says where its time went (`phases`). Samples are drawn at random
(scattered over every file: the worst case), and for the first index type one whole image set
is forgotten too (its samples arrived together, so they sit in one embedding part).
"""
import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss

from vismem_assets.forgetting import ForgetRequest
from vismem_assets.index_types import KINDS, IndexPolicy

from .synthetic import bench_encoder, build_memory


def run(n: int, d: int = 1280, sizes=(1, 100, 10_000), retained: int = 1, kinds=("flat",), shards: int = 1) -> dict:
    """`kinds`: index types measured one after another on the same memory (the first is the
    headline figure; each later one forgets only its largest size, from a fresh rebuild);
    `shards`: the memory split into that many (each rebuild writes every shard)."""
    encoder = bench_encoder(d)
    with tempfile.TemporaryDirectory(prefix="vismem-bench-") as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # its progress line must not break --json
            memory = build_memory(Path(tmp) / "home", n, encoder, index_policy=IndexPolicy(kind=kinds[0]))
        result = {"n": n, "d": d, "threads": faiss.omp_get_max_threads(), "retained_versions": retained,
                  "shards": shards, "types": {}}
        for kind in kinds:
            memory.indexes.policy = IndexPolicy(kind=kind, recall_floor=0.05 if kind == "ivf-pq" else 0.95)
            first = kind == kinds[0]
            rebuilds = []
            for _ in range(3 if first else 1):
                t0 = time.perf_counter()
                live = memory.rebuild(n_shards=shards)
                rebuilds.append(time.perf_counter() - t0)
            rebuild = statistics.median(rebuilds)
            memory.indexes.retain(retained + 1)  # the live version plus `retained` older ones
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
                report = memory.forget(ForgetRequest(requested_by="bench", reason=f"forget {size} ({kind})", sample_ids=ids))
                memory.indexes.retain(retained + 1)
                row["forget"].append(_figures(report, rebuild, samples=size))
            result["types"][kind] = row
        head = result["types"][kinds[0]]
        result.update(index_type=head["index_type"], rebuild_seconds=head["rebuild_seconds"], forget=head["forget"],
                      forget_set=head["forget_set"], forget_seconds=head["forget"][-1]["seconds"],
                      forget_ratio=head["forget"][-1]["ratio_to_rebuild"],
                      forget_index_ratio=head["forget"][-1]["index_ratio"])
    return result


def _figures(report, rebuild: float, **extra) -> dict:
    """A forget's seconds, its phases and its ratios to the rebuild: the whole request, and the
    erasure in the index files alone (the like of the add benchmark's index work)."""
    return {**extra, "seconds": round(report.seconds, 4), "ratio_to_rebuild": round(report.seconds / rebuild, 4),
            "index_seconds": report.phases["indexes"], "index_ratio": round(report.phases["indexes"] / rebuild, 4),
            "phases": report.phases}


def _forget_set(memory, rebuild: float, retained: int) -> dict:
    name, n = memory.ledger.query("SELECT image_set, count(*) AS n FROM samples WHERE status = 'active'"
                                  " GROUP BY image_set ORDER BY image_set LIMIT 1").row(0)
    report = memory.forget(ForgetRequest(requested_by="bench", reason="forget a set", image_set=name))
    memory.indexes.retain(retained + 1)
    return {"image_set": name, **_figures(report, rebuild, samples=n)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--types", nargs="+", default=["flat"], choices=KINDS[1:])
    parser.add_argument("--shards", type=int, default=1, help="shards the memory is split into (default 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n, args.d, sizes=tuple(s for s in (1, 100, 10_000) if s < args.n // 2), kinds=tuple(args.types),
                 shards=args.shards)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\nN = {result['n']}, d = {result['d']}, {result['shards']} shard(s), {result['threads']} threads, "
          f"{result['retained_versions']} retained version(s) beside the live one")
    for kind, t in result["types"].items():
        print(f"{kind} ({t['index_type']}): full rebuild (ledger + embeddings -> new version) {t['rebuild_seconds']:.3f} s")
        rows = [(f"{row['samples']:>6} samples", row) for row in t["forget"]]
        if "forget_set" in t:
            rows.append((f"image set {t['forget_set']['image_set']} ({t['forget_set']['samples']} samples)", t["forget_set"]))
        for what, row in rows:
            print(f"  forget {what}: {row['seconds']:.3f} s = {row['ratio_to_rebuild']:.3f} x rebuild (index files "
                  f"{row['index_ratio']:.3f} x); " + ", ".join(f"{k} {v:.2f} s" for k, v in row["phases"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
