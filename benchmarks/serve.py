"""`vismem serve` under load, beside what a single image costs elsewhere, in the same run.

    python -m benchmarks.serve [--memory 1000] [--requests 2000] [--clients 8] [--json] [--write]

A memory of Fashion-MNIST training images is built and served on loopback; `--clients` threads,
each with its own HTTP connection, send `--requests` single-image POST /classify calls in all
(held-out test images). Baselines: the bare encoder on one image in this process, and
`vismem classify IMAGE` as a process (what a caller without the server pays per image).
`--write` puts the table in benchmarks/SERVE.md.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import requests

from vismem_assets.fashion_mnist import write_image_folders
from vismem_assets.memory import Memory
from vismem_assets.settings import Settings, setup

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(home: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), "serve", "--port",
                             str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("vismem serve did not come up in 2 minutes")


def _load(url: str, images: list[tuple[str, bytes]], n_requests: int, clients: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def client():
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = images[i % len(images)]
                t0 = time.perf_counter()
                answer = session.post(f"{url}/classify", files=[("files", (name, data, "image/png"))], timeout=120)
                seconds = time.perf_counter() - t0
                with lock:
                    latencies.append(seconds)
                    if answer.status_code != 200:
                        errors.append(f"{answer.status_code}: {answer.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"requests": n_requests, "clients": clients, "errors": len(errors), "first_errors": errors[:3],
            "wall_s": round(wall, 2), "throughput_rps": round(n_requests / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def run(memory_size: int = 1000, n_requests: int = 2000, clients: int = 8) -> dict:
    with tempfile.TemporaryDirectory(prefix="vismem-serve-bench-") as tmp:
        root = Path(tmp)
        write_image_folders(root / "train", "train", memory_size, seed=1)
        write_image_folders(root / "test", "test", 200, seed=2)
        memory = Memory(root / "home", settings=Settings.from_env(home=str(root / "home")))
        memory.add(root / "train", name="train", progress=False)
        queries = sorted((root / "test").rglob("*.png"))
        images = [(p.name, p.read_bytes()) for p in queries]

        encoder = memory.encoder
        encoder.embed([queries[0]], progress=False)   # warm
        bare = []
        for p in queries[:50]:
            t0 = time.perf_counter()
            encoder.embed([p], progress=False)
            bare.append(time.perf_counter() - t0)
        cli = []
        for p in queries[:5]:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(root / "home"), "classify",
                            str(p), "--json"], cwd=REPO, check=True, capture_output=True, timeout=600)
            cli.append(time.perf_counter() - t0)

        proc, url = _serve(root / "home")
        try:
            _load(url, images, 50, 1)   # warm: the first requests load the index
            load = _load(url, images, n_requests, clients)
            single = _load(url, images, 200, 1)
        finally:
            proc.terminate()
            proc.wait(30)
    return {"memory": memory_size, "load": load, "one_client": single,
            "bare_encoder_ms_per_image": round(statistics.median(bare) * 1000, 1),
            "cli_s_per_image": round(statistics.median(cli), 2),
            "server_vs_cli": round(statistics.median(cli) * load["throughput_rps"], 1)}


def markdown(r: dict) -> str:
    load, one = r["load"], r["one_client"]
    return "\n".join([
        "# `vismem serve` under load (issue 19)", "",
        f"`python -m benchmarks.serve --memory {r['memory']} --requests {load['requests']} --clients {load['clients']}` "
        "on this machine (2 cores, shared): a memory of Fashion-MNIST training images (the default encoder, exact "
        "index), single-image POST /classify calls of held-out test images on loopback; the baselines measured in "
        "the same run.", "",
        "| what | requests | clients | errors | throughput (images/s) | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|",
        f"| vismem serve | {load['requests']} | {load['clients']} | {load['errors']} | {load['throughput_rps']} | "
        f"{load['p50_ms']} | {load['p99_ms']} |",
        f"| vismem serve, one client | {one['requests']} | 1 | {one['errors']} | {one['throughput_rps']} | "
        f"{one['p50_ms']} | {one['p99_ms']} |",
        f"| `vismem classify IMAGE` as a process | 5 | 1 | 0 | {1 / r['cli_s_per_image']:.2f} | "
        f"{r['cli_s_per_image'] * 1000:.0f} | – |",
        f"| the bare encoder, one image in-process | 50 | 1 | 0 | {1000 / r['bare_encoder_ms_per_image']:.1f} | "
        f"{r['bare_encoder_ms_per_image']} | – |", "",
        f"The server answers {r['server_vs_cli']}× as many images per second as one `vismem classify` process per "
        "image (which loads the encoder and opens the memory each time); requests enter the memory one at a time, "
        "so 8 clients raise throughput only by overlapping HTTP and decoding with the search.", ""])


def main(argv=None) -> int:
    setup()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", action="store_true", help="write benchmarks/SERVE.md")
    args = parser.parse_args(argv)
    result = run(args.memory, args.requests, args.clients)
    print(json.dumps(result) if args.json else markdown(result))
    if args.write:
        (REPO / "benchmarks" / "SERVE.md").write_text(markdown(result))
    return 0 if result["load"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
