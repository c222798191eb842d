"""The cluster profile on this machine: embedding throughput with 1 and 2 embedding workers, and
the fixed cost a run pays on the Celery executor.

    python -m benchmarks.cluster [--n 1024] [--json] > benchmarks/CLUSTER.md

For each worker count, `scripts/cluster.sh up` in a temporary folder (VISMEM_EMBED_WORKERS=w,
each worker given nproc / w ONNX threads), then two sets dropped in the inbox one after the other:
`tiny` (4 images: what a run costs beyond its work) and `big` (n Fashion-MNIST images). Read back
from the instance:

  encode images/s   n / (last encode step's end - first encode step's start) of `big`
  run wall          RUN_START to RUN_SUCCESS of the ingest run
  steps busy        the steps' own time (STEP_START to STEP_SUCCESS), summed
  dispatch          per step, submitted to the queue -> STEP_START in a worker (mean)
  start-up          RUN_START -> first step submitted (the run's process loading the code location)

The baseline, measured in this process first: `encoder.embed` of the same n images with every core.
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

from vismem_assets.settings import setup

setup()

from vismem_assets.encoders import load_encoder  # noqa: E402
from vismem_assets.fashion_mnist import write_image_folders  # noqa: E402

from .local_cluster import LocalCluster, run_interval, steps  # noqa: E402


def wait_for_run(cluster: LocalCluster, instance, partition: str, timeout: float = 900):
    from dagster import DagsterRunStatus, RunsFilter

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(RunsFilter(job_name="ingest_image_set", tags={"dagster/partition": partition}))
        if runs and runs[0].status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE):
            if runs[0].status == DagsterRunStatus.FAILURE:
                raise RuntimeError(f"ingest of {partition} failed\n{cluster.logs()}")
            return runs[0]
        time.sleep(1)
    raise TimeoutError(f"no finished ingest run of {partition} after {timeout} s\n{cluster.logs()}")


def settle(instance, quiet_s: float = 15, timeout: float = 600) -> None:
    """Wait until no run is unfinished and none was created for `quiet_s` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [(r.run_id, r.is_finished) for r in instance.get_runs()]
        time.sleep(quiet_s)
        after = [(r.run_id, r.is_finished) for r in instance.get_runs()]
        if before == after and all(done for _, done in after):
            return
    raise TimeoutError("the cluster did not settle")


def measure(run_steps: dict, interval: tuple[float, float]) -> dict:
    started = [s for s in run_steps.values() if "start" in s and "end" in s]
    encodes = [s for k, s in run_steps.items() if k.startswith("embeddings.encode_part[") and "end" in s]
    images = sum(s["metadata"].get("images", 0) for s in encodes)
    encode_wall = max(s["end"] for s in encodes) - min(s["start"] for s in encodes)
    dispatch = [s["start"] - s["submitted"] for s in started if "submitted" in s]
    first_submit = min(s["submitted"] for s in started if "submitted" in s)
    return {"images": images, "encode_steps": len(encodes),
            "encode_pids": len({s["metadata"]["pid"] for s in encodes}),
            "encode_wall_s": round(encode_wall, 2), "encode_images_per_s": round(images / encode_wall, 1),
            "run_wall_s": round(interval[1] - interval[0], 2),
            "steps_busy_s": round(sum(s["end"] - s["start"] for s in started), 2),
            "dispatch_mean_s": round(statistics.mean(dispatch), 2), "startup_s": round(first_submit - interval[0], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="images in the big set")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vismem-bench-cluster-"))
    write_image_folders(work / "tiny", "test", 4, seed=3, classes=(0, 1))
    write_image_folders(work / "big", "train", args.n, seed=21)
    paths = sorted((work / "big").rglob("*.png"))
    encoder = load_encoder("efficientnet-lite0")
    encoder.embed(paths[:64], progress=False)
    t0 = time.perf_counter()
    encoder.embed(paths, progress=False)
    baseline = {"images": len(paths), "images_per_s": round(len(paths) / (time.perf_counter() - t0), 1),
                "threads": encoder.runtime_info().get("threads")}
    load = [os.getloadavg()[0]]
    results = {}
    for w in [int(x) for x in args.workers.split(",")]:
        cluster = LocalCluster({"VISMEM_EMBED_WORKERS": str(w), "VISMEM_SCHEDULES": "0"}).up()
        try:
            instance = cluster.instance()
            row = {}
            for name in ("tiny", "big"):
                cluster.drop(work / name, name)
                run = wait_for_run(cluster, instance, name)
                row[name] = measure(steps(instance, run.run_id), run_interval(instance, run.run_id))
                settle(instance)  # the refresh the sensor launches after it, before the next set
            results[w] = row
        finally:
            left = cluster.down()
            if left:
                print(f"cluster.sh down left {left} running", file=sys.stderr)
    load.append(os.getloadavg()[0])
    if args.json:
        print(json.dumps({"baseline": baseline, "workers": results, "load": load}, indent=2))
        return 0
    print("# Cluster benchmark (issue 18)\n")
    print(f"`python -m benchmarks.cluster --n {args.n}` on this machine ({os.cpu_count()} cores, shared; "
          f"1-minute load average {load[0]:.1f} at start, {load[1]:.1f} at end). The cluster is the one "
          "`scripts/cluster.sh up` starts, on one machine; the workers share its cores.\n")
    print(f"Baseline: `encoder.embed` of the same {baseline['images']} images in one process "
          f"({baseline['threads']} threads): **{baseline['images_per_s']} images/s**.\n")
    print("| embedding workers | set | images | encode steps (processes) | encode images/s | vs baseline "
          "| run wall s | steps busy s | start-up s | dispatch per step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w, row in results.items():
        for name, m in row.items():
            print(f"| {w} | {name} | {m['images']} | {m['encode_steps']} ({m['encode_pids']}) | "
                  f"{m['encode_images_per_s']} | {m['encode_images_per_s'] / baseline['images_per_s']:.2f} | "
                  f"{m['run_wall_s']} | {m['steps_busy_s']} | {m['startup_s']} | {m['dispatch_mean_s']} |")
    print("\nThe `tiny` rows are the fixed cost: the run's own work is the steps' busy time; the rest of its wall "
          "time is paid per step in sequence (six: plan_ingest, read_files, register_ingest, plan_embedding, "
          "encode_part, record_embeddings): a step waits in Redis and for a worker "
          "to load the job (dispatch), and the Celery executor looks at its tasks once a second "
          "(dagster-celery's TICK_SECONDS = 1), about 2 s a step in all. The run's process starting before RUN_START "
          "is not counted. On one 2-core machine two workers cannot beat one worker with both cores: they split the "
          "same cores (the `big` rows); a worker on another machine adds its own cores, which this machine cannot "
          "show.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
