"""Peak resident memory of a process that searches the memory, against the index size on disk.

    python -m benchmarks.memory [--n 100000] [--d 1280] [--types flat ivf-flat] [--json]

A child process opens the memory (sha256 check, faiss.read_index) and answers 100 queries; its
peak RSS and its anonymous memory are compared with the index file's size and with a baseline
child that only imports the same libraries, for a flat index (read whole) and an IVF one
(memory-mapped).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from vismem_assets.index_types import KINDS, IndexPolicy

from .synthetic import bench_encoder, build_memory

IMPORTS = "import numpy, faiss, duckdb, polars, torch; import vismem_assets.memory"
# VmHWM belongs to the process image, so the parent's memory at fork time does not count
# (ru_maxrss would: it survives exec).
# RssAnon is the process's own memory; a memory-mapped index's pages are the file's (RssFile:
# shared with the page cache, reclaimable), so both are reported.
REPORT = ("\nprint(*[l.split()[1] for l in open('/proc/self/status') if l.startswith(('VmHWM', 'RssAnon'))])")
SEARCH = IMPORTS + """
import numpy as np, sys
from benchmarks.synthetic import bench_encoder
from vismem_assets.memory import Memory
m = Memory(sys.argv[1], encoder=bench_encoder(int(sys.argv[2])))
q = np.random.default_rng(0).standard_normal((100, m.encoder.dim)).astype(np.float32)
q /= np.linalg.norm(q, axis=1, keepdims=True)
m.search(q, 20)
"""


def peak_rss_mib(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS (VmHWM), anonymous RSS at the end) of a fresh child process running `code`, MiB."""
    out = subprocess.run([sys.executable, "-c", code + REPORT, *args], check=True, capture_output=True, text=True)
    hwm, anon = out.stdout.split()[-2:]
    return int(hwm) / 1024, int(anon) / 1024  # kB


def run(n: int, d: int = 1280, kinds=("flat",)) -> dict:
    """`kinds`: index types measured one after another on the same memory (the first is the
    headline figure): a flat index is read whole, an IVF one memory-mapped."""
    encoder = bench_encoder(d)
    with tempfile.TemporaryDirectory(prefix="vismem-bench-") as tmp:
        memory = build_memory(Path(tmp) / "home", n, encoder, index_policy=IndexPolicy(kind=kinds[0]))
        baseline, baseline_anon = peak_rss_mib(IMPORTS)
        out = {"n": n, "d": encoder.dim, "baseline_rss_mib": round(baseline, 1), "types": {}}
        for kind in kinds:
            if kind != kinds[0]:
                memory.indexes.policy = IndexPolicy(kind=kind, recall_floor=0.5)
                memory.rebuild()
            live = memory.indexes.live()
            index_mib = sum(memory.layout.absolute(f.path).stat().st_size for f in live.files) / 2**20
            searching, searching_anon = peak_rss_mib(SEARCH, str(memory.layout.root), str(d))
            out["types"][kind] = {"index_type": live.index_type, "index_mib": round(index_mib, 1),
                                  "search_rss_mib": round(searching, 1),
                                  "rss_over_index": round((searching - baseline) / index_mib, 3),
                                  "anon_over_index": round((searching_anon - baseline_anon) / index_mib, 3)}
    return {**out, **out["types"][kinds[0]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--types", nargs="+", default=["flat", "ivf-flat"], choices=KINDS[1:])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.n, args.d, kinds=tuple(args.types))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"\nN = {result['n']}, d = {result['d']}; the imports alone peak at {result['baseline_rss_mib']} MiB")
    for kind, t in result["types"].items():
        print(f"{kind} ({t['index_type']}): index file {t['index_mib']} MiB; peak RSS of a searching process "
              f"{t['search_rss_mib']} MiB = {t['rss_over_index']} x the index above the imports, its own "
              f"(anonymous) memory {t['anon_over_index']} x (a mapped file's pages are not its own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
