"""The demo life cycle on built-in data: Fashion-MNIST image sets arrive in the inbox over
time, the last one bringing two classes the memory has never seen.

    python -m dagster_project.demo feed       # drop the sets one by one (next to `dagster dev`)
    python -m dagster_project.demo headless   # the same life cycle in-process, then a summary
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from dagster import DagsterInstance, build_sensor_context, instance_for_test

from vismem_assets.fashion_mnist import CLASSES, write_image_folders
from vismem_assets.glance import accuracy_on
from vismem_assets.home import Layout, resolve_home
from vismem_assets.settings import Settings

NEW_CLASSES = ("Trouser", "Bag")  # arrive late; the memory has never seen them before
OLD = tuple(i for i, name in enumerate(CLASSES) if name not in NEW_CLASSES)
NEW = tuple(i for i, name in enumerate(CLASSES) if name in NEW_CLASSES)
QUERY_SET = "queries/fashion-test"


def plan(per_set: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(set name, classes, images): three sets of the old classes, then the late new classes."""
    late = round(per_set * len(NEW) / len(OLD)) * 3  # as many per class as the old classes got
    return [("fashion-01", OLD, per_set), ("fashion-02", OLD, per_set), ("fashion-03", OLD, per_set),
            ("fashion-late-new-classes", NEW, late)]


def prepare(home: Path, per_set: int, n_queries: int) -> Path:
    """Write the labelled query set (all ten classes) and stage the sets outside the inbox."""
    layout = Layout(home).create()
    write_image_folders(layout.root / QUERY_SET, "test", n_queries, seed=7)
    staging = layout.root / "demo-staging"
    used = np.empty(0, np.int64)  # the sets never share an image
    for i, (name, classes, n) in enumerate(plan(per_set)):
        used = np.union1d(used, write_image_folders(staging / name, "train", n, seed=100 + i, classes=classes,
                                                    exclude=used))
    return staging


def deliver(home: Path, staging: Path, name: str) -> None:
    """Move a staged set into the inbox whole, then mark it ready — as a careful user would."""
    target = Layout(home).inbox_sets / name
    if target.exists():
        return
    shutil.move(str(staging / name), str(target))
    (target / "_READY").touch()
    print(f"demo: delivered {name} to {target}", flush=True)


def feed(home: Path, per_set: int, n_queries: int, first_delay: float, interval: float) -> None:
    staging = prepare(home, per_set, n_queries)
    time.sleep(first_delay)
    for i, (name, _, _) in enumerate(plan(per_set)):
        if i:
            time.sleep(interval)
        deliver(home, staging, name)


def headless(home: Path, per_set: int, n_queries: int) -> pl.DataFrame:
    """Run the code location's sensors and jobs in-process for each arriving set."""
    from .definitions import defs
    from .sensors import embeddings_sensor, image_set_sensor

    os.environ["VISMEM_HOME"] = str(home)
    os.environ.setdefault("VISMEM_QUERY_SET", QUERY_SET)
    staging = prepare(home, per_set, n_queries)
    resources = {"visual_memory": defs.resources["visual_memory"]}
    rows = []
    with instance_for_test() as instance:
        set_cursor = asset_cursor = None
        for name, _, _ in plan(per_set):
            deliver(home, staging, name)
            t0 = time.perf_counter()
            tick = image_set_sensor(build_sensor_context(instance, cursor=set_cursor, resources=resources))
            set_cursor = tick.cursor
            for request in tick.dynamic_partitions_requests:
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            for request in tick.run_requests:
                _run(defs, instance, "ingest_image_set", request.partition_key)
            tick = embeddings_sensor.evaluate_tick(build_sensor_context(instance, cursor=asset_cursor))
            asset_cursor = tick.cursor
            for _ in tick.run_requests:
                _run(defs, instance, "refresh_memory")
            rows.append(_summary(instance, name, time.perf_counter() - t0))
            print("demo: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return pl.DataFrame(rows)


def _run(defs, instance: DagsterInstance, job: str, partition_key: str | None = None) -> None:
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=partition_key,
                                                          run_config=quiet)
    if not result.success:
        raise RuntimeError(f"demo: run of {job} {partition_key or ''} failed")


def _summary(instance: DagsterInstance, name: str, seconds: float) -> dict:
    from dagster import AssetKey

    meta = instance.get_latest_materialization_event(AssetKey("evaluation")).asset_materialization.metadata
    # The demo's own split, fixed in advance (the asset's splits by what the last change brought):
    # the two late classes are reported from the start, at 0.0 until they arrive.
    per_label = pl.DataFrame([r.data for r in meta["per_label"].value.records])
    labels = set(per_label["label"])
    return {"after set": name, "index version": int(meta["index_version"].value),
            "top-1 (rank, k=20)": round(meta["top1_rank_k20"].value, 4),
            "old classes": round(accuracy_on(per_label, labels - set(NEW_CLASSES)) or 0.0, 4),
            "new classes": round(accuracy_on(per_label, labels & set(NEW_CLASSES)) or 0.0, 4),
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dagster_project.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("feed", "headless"))
    parser.add_argument("--home", help="memory home (default: $VISMEM_HOME, else ./vismem_home)")
    parser.add_argument("--per-set", type=int, default=480, help="images in each of the three first sets")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--first-delay", type=float, default=20.0, help="feed: seconds before the first set")
    parser.add_argument("--interval", type=float, default=60.0, help="feed: seconds between sets")
    args = parser.parse_args(argv)
    home = resolve_home(Settings.from_env(home=args.home).home)
    if args.mode == "feed":
        feed(home, args.per_set, args.queries, args.first_delay, args.interval)
        return 0
    summary = headless(home, args.per_set, args.queries)
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print("\nthe memory's life, one row per arriving set (accuracy on the labelled query set):")
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
