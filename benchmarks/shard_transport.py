"""What a search pays to go through a shard worker (Celery over Redis), against the same search in
this process, in the same run.

    python -m benchmarks.shard_transport [--n 20000] [--repeats 200] [--json] [--write]

A synthetic memory of N vectors (benchmarks/synthetic.py, d = 1280, exact: one shard) is served
by one real shard worker (`vismem shard-worker 0`) on a throwaway Redis (scripts/services.sh).
Each search (k = 10) runs once in this process (Recall: the live version read from the ledger,
the shard's searcher) and once through the worker (ShardClient: the queries packed as float32
bytes, sent, searched there after the same ledger read, the answer back, merged), at batch 1
and batch 1,000; the median of each and their ratio. `--write` puts the table under
"Transport: Celery round trip" in benchmarks/SHARDS.md (other sections there are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.synthetic import bench_encoder, build_memory, clustered_vectors
from vismem_assets.memory import Memory
from vismem_assets.settings import Settings, setup

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "scripts" / "services.sh"
HEADING = "## Transport: Celery round trip"
K = 10


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_ms(search, queries: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(queries, K)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def run(n: int, repeats: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="vismem-bench-shards-"))
    port = _free_port()
    subprocess.run(["bash", str(SERVICES), "redis-start", str(root / "redis"), str(port)], check=True,
                   capture_output=True, timeout=60)
    worker = None
    try:
        encoder = bench_encoder(1280)
        local = build_memory(root / "home", n, encoder)
        broker = dict(broker_url=f"redis://127.0.0.1:{port}/0", broker_backend=f"redis://127.0.0.1:{port}/1")
        env = {**os.environ, "PYTHONPATH": str(REPO), "VISMEM_BROKER_URL": broker["broker_url"],
               "VISMEM_BROKER_BACKEND": broker["broker_backend"]}
        log = root / "shard-worker-0.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen([sys.executable, "-m", "vismem_assets.cli", "--home", str(root / "home"),
                                       "shard-worker", "0"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while " ready." not in log.read_text():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the shard worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        remote = Memory(root / "home", encoder=encoder,
                        settings=Settings(home=root / "home", shard_workers=True, shard_timeout=120, **broker))
        queries, _ = clustered_vectors(1000, encoder.dim, seed=7)
        rows = []
        for batch in (1, 1000):
            q = queries[:batch]
            np.testing.assert_array_equal(remote.search(q, K)[1], local.search(q, K)[1])  # also warms both up
            times = max(repeats // batch * 5, 10) if batch > 1 else repeats
            inproc = _median_ms(local.search, q, times)
            through = _median_ms(remote.search, q, times)
            rows.append({"batch": batch, "repeats": times, "in_process_ms": round(inproc, 3),
                         "worker_ms": round(through, 3), "ratio": round(through / inproc, 2),
                         "overhead_ms": round(through - inproc, 3), "request_bytes": q.nbytes})
        return {"n": n, "d": encoder.dim, "k": K, "cores": os.cpu_count(), "rows": rows}
    finally:
        if worker is not None:
            worker.kill()
            worker.wait(30)
        subprocess.run(["bash", str(SERVICES), "redis-stop", str(root / "redis")], check=False, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def markdown(result: dict) -> str:
    lines = [HEADING, "",
             f"`python -m benchmarks.shard_transport --n {result['n']}`: one search (k = {result['k']}) over "
             f"{result['n']:,} synthetic vectors (d = {result['d']}, exact, one shard), in this process (Recall) and "
             f"through one shard worker (Celery, Redis on loopback, {result['cores']} cores shared by both); medians.",
             "", "| batch | in process | through the worker | ratio | added per search | queries sent |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']:,} | {r['in_process_ms']:.2f} ms | {r['worker_ms']:.2f} ms | {r['ratio']:.2f}× | "
                     f"{r['overhead_ms']:.2f} ms | {r['request_bytes'] / 1024:,.0f} KiB |")
    return "\n".join(lines) + "\n"


def write_section(section: str, path: Path = REPO / "benchmarks" / "SHARDS.md") -> None:
    """Put this section in SHARDS.md, replacing its earlier text and keeping the others."""
    text = path.read_text() if path.exists() else "# Shards\n\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=200, help="searches of batch 1 (batch 1,000: fewer)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the section in benchmarks/SHARDS.md")
    args = parser.parse_args(argv)
    result = run(args.n, args.repeats)
    section = markdown(result)
    print(json.dumps(result) if args.json else section)
    if args.write:
        write_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
