"""Embedding: images per second of the full path against the bare encoder forward, per backend.

    python -m benchmarks.embedding [--n 512] [--quick] [--json] [--backend both|onnx|torch] [--repeats R]

Images: n Fashion-MNIST test images written as PNG folders (vismem_assets.fashion_mnist), as a
user's image set is; each is decoded, resized 28 -> 256 (bicubic), cropped to 224 and scaled.

  full path   `encoder.embed(paths)` as vismem runs it (decode + preprocess, forward, normalise)
              and writing the vectors to parquet: overlapped or sequential, as `embed` chooses
              (overlapped only where a core is left over beside the forward's threads)
  overlapped  the same, decoding each batch on a helper thread during the forward of the last
  sequential  the same, decoding each batch before its forward: what overlap buys
  bare        `encoder.forward` alone on the same images already preprocessed, batch for batch
              (batch size 32): the limit the full path is measured against
  decode      `encoder.prepare` alone (decode + preprocess, one thread): what there is to hide

embed_ratio = full images/s / bare images/s (target >= 0.85). Within each of `repeats` runs the
variants take turns on chunks of 128 images, so that load from other processes on a shared
machine falls on all of them alike; images/s are medians over the runs, embed_ratio their ratio
(embed_ratio_paired, the median of the per-chunk ratios, beside it).
The 1-minute load average at start and end is reported with the figures. Eager torch is several times slower,
so it runs on the first `--torch-n` images (default min(n, 64); --quick 32), at most 3 runs. ONNX Runtime also reports the
bare forward at each intra-op thread count from 1 to the cores available (not in --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from vismem_assets.encoders import onnx_backend
from vismem_assets.encoders.efficientnet import EfficientNetLite0
from vismem_assets.fashion_mnist import write_image_folders

BATCH = 32
CHUNK = 128  # images timed per variant before switching to the next one


def elapsed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rounded(x: float, digits: int):
    return None if x != x else round(x, digits)  # NaN (not measured) -> null in JSON


def write_parquet(path: Path, paths: list[Path], vectors: np.ndarray) -> None:
    pl.DataFrame({"path": [str(p) for p in paths],
                  "vector": pl.Series(vectors, dtype=pl.Array(pl.Float32, vectors.shape[1]))}).write_parquet(path)


def measure(encoder: EfficientNetLite0, paths: list[Path], out: Path, repeats: int, sequential: bool = True) -> dict:
    """Bare forward, full path, decoding alone and (optionally) the sequential full path on `paths`.

    Each repeat walks the images in chunks of CHUNK, timing every variant on each chunk in turn
    (in a rotating order), so that a burst of load from elsewhere lands on all variants alike.
    Images/s come from each variant's median time per repeat (the sum over its chunks) and the
    ratios from those; the *_paired ratios are medians of the per-chunk ratios instead, each
    between two runs seconds apart. Each chunk's vectors are written to a parquet file, as
    `vismem add` writes embeddings in parts.
    """
    encoder.batch_size = BATCH
    info = encoder.runtime_info()  # resolves the backend (export and parity check happen here, untimed)
    batches = [encoder.prepare(paths[i: i + BATCH]) for i in range(0, len(paths), BATCH)]
    with torch.inference_mode():
        encoder.forward(batches[0])  # warm-up: first-run allocations and kernel choices
    per_chunk = CHUNK // BATCH
    chunks = [(paths[i: i + CHUNK], batches[i // BATCH: i // BATCH + per_chunk]) for i in range(0, len(paths), CHUNK)]

    def bare(chunk):
        with torch.inference_mode():
            for batch in chunk[1]:
                encoder.forward(batch)

    def full(chunk, overlap: bool):
        vectors = encoder.embed(chunk[0], progress=False, overlap=overlap)
        write_parquet(out / f"part-{overlap:d}.parquet", chunk[0], vectors)

    def decode(chunk):
        for i in range(0, len(chunk[0]), BATCH):
            encoder.prepare(chunk[0][i: i + BATCH])

    variants = {"bare": bare, "overlapped": lambda c: full(c, True), "decode": decode}
    if sequential:
        variants["sequential"] = lambda c: full(c, False)
    names = list(variants)
    turns = {name: [] for name in ("bare", "overlapped", "sequential", "decode")}  # seconds per (repeat, chunk)
    step = 0
    for _ in range(repeats):
        for chunk in chunks:
            for name in names[step % len(names):] + names[: step % len(names)]:
                turns[name].append(elapsed(lambda: variants[name](chunk)))
            step += 1
    n = len(paths)

    def per_repeat(name):
        return [sum(turns[name][r * len(chunks):(r + 1) * len(chunks)]) for r in range(repeats)] if turns[name] else []

    times = {name: per_repeat(name) for name in turns}
    default = "overlapped" if encoder.overlaps() or not turns["sequential"] else "sequential"
    times["full"], turns["full"] = times[default], turns[default]  # the path `embed` takes by default
    sec = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}

    def ratio(name):
        pairs = [b / t for b, t in zip(turns["bare"], turns[name])]
        return rounded(statistics.median(pairs), 3) if pairs else None

    return {
        "backend": info["backend"], "threads": info["threads"], "inter_op_threads": info.get("inter_op_threads"),
        "n": n, "batch_size": BATCH, "repeats": repeats, "chunk": CHUNK, "full_path": default,
        "images_per_second_bare": round(n / sec["bare"], 2),
        "images_per_second_full": round(n / sec["full"], 2),
        "images_per_second_overlapped": round(n / sec["overlapped"], 2),
        "images_per_second_sequential": rounded(n / sec["sequential"], 2),
        "ms_per_image_bare": round(1000 * sec["bare"] / n, 2),
        "ms_per_image_full": round(1000 * sec["full"] / n, 2),
        "ms_per_image_sequential": rounded(1000 * sec["sequential"] / n, 2),
        "ms_per_image_decode_preprocess": round(1000 * sec["decode"] / n, 2),
        "embed_ratio": round(sec["bare"] / sec["full"], 3),
        "embed_ratio_overlapped": round(sec["bare"] / sec["overlapped"], 3),
        "embed_ratio_sequential": rounded(sec["bare"] / sec["sequential"], 3),
        "embed_ratio_paired": ratio("full"),
        "embed_ratio_sequential_paired": ratio("sequential"),
        "parity_max_abs_diff": info.get("parity_max_abs_diff"),
        "seconds_per_repeat": {k: [round(t, 3) for t in v] for k, v in times.items() if v and k != "full"},
    }


def onnx_thread_sweep(encoder: EfficientNetLite0, paths: list[Path], repeats: int) -> dict[int, float]:
    """ms/image of the bare ONNX forward at each intra-op thread count, sessions side by side."""
    batches = [encoder.prepare(paths[i: i + BATCH]) for i in range(0, len(paths), BATCH)]
    runners = {}
    for threads in range(1, onnx_backend.available_cores() + 1):
        runner = EfficientNetLite0(backend="onnx", threads=threads)
        runner.forward(batches[0])
        runners[threads] = runner
    times = {t: [] for t in runners}
    for _ in range(repeats):
        for threads, runner in runners.items():
            times[threads].append(elapsed(lambda: [runner.forward(b) for b in batches]))
    return {t: round(1000 * statistics.median(v) / len(paths), 2) for t, v in times.items()}



def run(n: int = 512, quick: bool = False, backends=("onnx", "torch"), repeats: int | None = None,
        torch_n: int | None = None) -> dict:
    repeats = repeats or (3 if quick else 5)
    torch_n = min(n, torch_n or (32 if quick else 64))
    load_start = round(os.getloadavg()[0], 2)  # others' work on a shared machine shows here
    with tempfile.TemporaryDirectory(prefix="vismem-bench-embed-") as tmp:
        folder = Path(tmp) / "images"
        write_image_folders(folder, "test", n, seed=0)
        paths = sorted(folder.rglob("*.png"))
        results = {}
        for backend in backends:
            encoder = EfficientNetLite0(backend=backend)
            subset = paths if backend == "onnx" else paths[:torch_n]
            # Decoding is a rounding error beside eager torch's forward: --quick skips its sequential run.
            (Path(tmp) / backend).mkdir()
            results[backend] = measure(encoder, subset, Path(tmp) / backend,
                                       repeats if backend == "onnx" else min(repeats, 3),
                                       sequential=backend == "onnx" or not quick)
            if backend == "onnx" and results[backend]["backend"] == "onnx" and not quick:
                results[backend]["bare_ms_per_image_by_threads"] = onnx_thread_sweep(encoder, paths[:128], repeats)
    # The headline is the backend the default encoder spec uses on this machine.
    default = EfficientNetLite0(backend="auto")
    headline = results.get(default.backend) or next(iter(results.values()))
    result = {
        "benchmark": "embedding", "n": n, "quick": quick, "cores": onnx_backend.available_cores(),
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "backend": headline["backend"], "threads": headline["threads"],
        "embed_ratio": headline["embed_ratio"],
        "embed_ratio_paired": headline["embed_ratio_paired"],
        "images_per_second_full": headline["images_per_second_full"],
        "images_per_second_bare": headline["images_per_second_bare"],
        "ms_per_image_bare": {b: r["ms_per_image_bare"] for b, r in results.items()},
        "embed_ratio_by_backend": {b: r["embed_ratio"] for b, r in results.items()},
        "target_embed_ratio": 0.85,
        "torch_threads": torch.get_num_threads(),
        "backends": results,
    }
    if "onnx" in results and "torch" in results:
        result["onnx_speedup_bare"] = round(results["torch"]["ms_per_image_bare"] / results["onnx"]["ms_per_image_bare"], 2)
    return result


def print_table(result: dict) -> None:
    runs = ", ".join(f"{r['repeats']} ({name})" for name, r in result["backends"].items())
    load = result["load_average_1min"]
    print(f"\nembedding: Fashion-MNIST PNGs (28x28 grey -> 224x224), batch {BATCH}, {result['cores']} cores available; "
          f"medians of {runs} runs; load average {load['start']} -> {load['end']}")
    head = f"{'backend':8} {'threads':>7} {'n':>5} {'bare img/s':>10} {'full img/s':>10} {'seq img/s':>9} " \
           f"{'ms/img bare':>11} {'ms/img full':>11} {'decode ms/img':>13} {'embed_ratio':>11} {'seq ratio':>9}"
    print(head)
    print("-" * len(head))

    def cell(x, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"

    for r in result["backends"].values():
        print(f"{r['backend']:8} {r['threads']:>7} {r['n']:>5} {cell(r['images_per_second_bare'], 10, 1)} "
              f"{cell(r['images_per_second_full'], 10, 1)} {cell(r['images_per_second_sequential'], 9, 1)} "
              f"{cell(r['ms_per_image_bare'], 11, 2)} {cell(r['ms_per_image_full'], 11, 2)} "
              f"{cell(r['ms_per_image_decode_preprocess'], 13, 2)} {cell(r['embed_ratio'], 11, 3)} "
              f"{cell(r['embed_ratio_sequential'], 9, 3)}")
    print(f"embed_ratio = full path / bare forward ({result['backend']}, the default backend here): "
          f"{result['embed_ratio']:.3f} (target >= {result['target_embed_ratio']})")
    if "onnx_speedup_bare" in result:
        print(f"ONNX Runtime bare forward is {result['onnx_speedup_bare']}x eager torch "
              f"(torch uses {result['torch_threads']} threads)")
    sweep = result["backends"].get("onnx", {}).get("bare_ms_per_image_by_threads")
    if sweep:
        print("ONNX Runtime bare forward by intra-op threads: "
              + ", ".join(f"{t}: {ms:.2f} ms/img" for t, ms in sweep.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="images (default 512; --quick 128)")
    parser.add_argument("--quick", action="store_true", help="128 images, 32 for torch, no thread sweep")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--backend", choices=("both", "onnx", "torch"), default="both")
    parser.add_argument("--repeats", type=int, default=None, help="runs of every variant (default 5; --quick 3)")
    parser.add_argument("--torch-n", type=int, default=None, help="images for eager torch (default min(n, 64))")
    args = parser.parse_args(argv)
    n = args.n or (128 if args.quick else 512)
    backends = ("onnx", "torch") if args.backend == "both" else (args.backend,)
    result = run(n, quick=args.quick, backends=backends, repeats=args.repeats, torch_n=args.torch_n)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
