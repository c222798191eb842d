"""Reliability: the full leave-one-out pass against the incremental updates, on N synthetic
clustered vectors (k = 10, the paper's soft-pruning K).

    python -m benchmarks.reliability [--n 100000] [--d 384] [--k 10] [--noise 2.5] [--json]

The noise (benchmarks.synthetic.clustered_vectors) is high enough that clusters overlap and
v is not all zeros; the cost does not depend on it.

A random 1% of the memory (the newest vector ids: what a set added later gets) is the change:
  full pass over the memory without it  -> base
  add it to base incrementally          -> must equal the full pass over everything
  full pass over everything             -> full (the reference time)
  remove it from full incrementally     -> must equal base
  (of which the drop a forget waits for: no search, the re-search is the next user's)
Two full passes, so the equality of both updates is checked against a full recomputation in
the same run; vectors_of reads from an in-memory array, as the caller reads embeddings.
"""
import argparse
import json
import sys
import time

import faiss
import numpy as np

from vismem_assets import reliability

from .synthetic import clustered_vectors


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time
    is the steadier figure."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - t0, time.process_time() - c0)


def run(n: int, d: int = 384, k: int = 10, noise: float = 2.5, fraction: float = 0.01, seed: int = 0) -> dict:
    vectors, labels = clustered_vectors(n, d, noise=noise, seed=seed)
    ids = np.arange(n, dtype=np.int64)
    m = max(1, int(round(n * fraction)))
    changed = ids[n - m:]  # the newest ids; clustered_vectors draws clusters at random, so a random 1%
    old = ids[: n - m]

    def vectors_of(q):
        return vectors[q]  # vector id = row here

    base, base_s = timed(lambda: reliability.compute(old, vectors[old], labels[old], k))
    (added, add_stats), add_s = timed(lambda: reliability.add(base, changed, vectors[changed], labels[changed], vectors_of))
    full, full_s = timed(lambda: reliability.compute(ids, vectors, labels, k))
    add_equal = reliability.equal(added, full)
    del added
    (_, drop_stats), drop_s = timed(lambda: reliability.drop(full, changed))
    (removed, remove_stats), remove_s = timed(lambda: reliability.remove(full, changed, vectors_of))
    remove_equal = reliability.equal(removed, base)
    (full_s, full_cpu), (base_s, _), (add_s, add_cpu), (remove_s, remove_cpu) = full_s, base_s, add_s, remove_s
    drop_s = drop_s[0]
    return {
        "n": n, "d": d, "k": k, "noise": noise, "changed": m, "threads": faiss.omp_get_max_threads(),
        "full_seconds": round(full_s, 3), "full_seconds_without_change": round(base_s, 3),
        "add_seconds": round(add_s, 3), "add_ratio": round(add_s / full_s, 4),
        "add_touched": add_stats["n_touched"], "add_checked": add_stats["n_checked"],
        "remove_seconds": round(remove_s, 3), "remove_ratio": round(remove_s / full_s, 4),
        "remove_requeried": remove_stats["n_requeried"],
        "drop_seconds": round(drop_s, 4), "drop_ratio": round(drop_s / full_s, 5), "drop_holed": drop_stats["n_holed"],
        "full_cpu_seconds": round(full_cpu, 3), "add_cpu_ratio": round(add_cpu / full_cpu, 4),
        "remove_cpu_ratio": round(remove_cpu / full_cpu, 4),
        "mean_v": round(float(full.v.mean()), 3), "share_v_positive": round(float((full.v > 0).mean()), 3),
        "add_equal": add_equal, "remove_equal": remove_equal, "equal": add_equal and remove_equal,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--noise", type=float, default=2.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = run(args.n, args.d, args.k, args.noise)
    if args.json:
        print(json.dumps(r))
        return 0 if r["equal"] else 1
    print(f"N = {r['n']}, d = {r['d']}, k = {r['k']}, {r['threads']} threads; change = {r['changed']} samples (1%)")
    print(f"mean v = {r['mean_v']}, share of samples with v > 0 = {r['share_v_positive']}")
    print(f"full pass:            {r['full_seconds']:.3f} s  (without the change: {r['full_seconds_without_change']:.3f} s)")
    print(f"incremental add:      {r['add_seconds']:.3f} s = {r['add_ratio']:.4f} x full "
          f"({r['add_touched']} rows touched, {r['add_checked']} checked)")
    print(f"incremental remove:   {r['remove_seconds']:.3f} s = {r['remove_ratio']:.4f} x full "
          f"({r['remove_requeried']} rows re-queried)")
    print(f"  of which the drop:  {r['drop_seconds']:.4f} s = {r['drop_ratio']:.5f} x full "
          f"(what a forget waits for: {r['drop_holed']} rows left with holes, searched again when next used)")
    print(f"by CPU time: full {r['full_cpu_seconds']:.3f} s, add {r['add_cpu_ratio']:.4f} x, "
          f"remove {r['remove_cpu_ratio']:.4f} x")
    print(f"equal: {r['equal']}  (add: {r['add_equal']}, remove: {r['remove_equal']})")
    return 0 if r["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
