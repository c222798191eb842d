"""Sensors: new image sets in the inbox, and new embeddings folded into the index.
A tick only lists folders; all heavy work happens in the runs it requests."""

import hashlib
import json

from dagster import (
    DefaultSensorStatus,
    EventLogEntry,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    in_process_executor,
    asset_sensor,
    sensor,
)

from vismem_assets.forgetting import ForgetRequest
from vismem_assets.home import Layout, resolve_home
from vismem_assets.imagesets import SET_NAME

from .assets import embeddings, evaluation, image_set_partitions, image_sets, memory_index, pruning_weights
from .resources import VisualMemory

READY_MARKER = "_READY"

ingest_job = define_asset_job(
    "ingest_image_set", selection=[image_sets, embeddings],
    executor_def=in_process_executor,  # both steps in one process: the model loads once per run
    description="Register an arrived image set and embed its new samples.",
)


def ready_sets(inbox) -> list[str]:
    """Set folders that hold the _READY marker: half-copied folders are never taken."""
    if not inbox.exists():
        return []
    return sorted(d.name for d in inbox.iterdir() if d.is_dir() and (d / READY_MARKER).is_file())


@sensor(job=ingest_job, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=10,
        description="Takes each complete image set (a folder with _READY) from $VISMEM_HOME/inbox/sets once.")
def image_set_sensor(context: SensorEvaluationContext, visual_memory: VisualMemory):
    inbox = Layout(resolve_home(visual_memory.home)).inbox_sets
    taken = set(json.loads(context.cursor)) if context.cursor else set()
    known = set(context.instance.get_dynamic_partitions(image_set_partitions.name))
    ready = ready_sets(inbox)
    bad_names = [n for n in ready if not SET_NAME.match(n)]
    new = [n for n in ready if n not in taken and n not in known and n not in bad_names]
    for name in bad_names:
        if name not in taken:
            context.log.warning(f"inbox set {name!r} is not a valid set name (letters, digits, . _ -); rename it")
    if not new:
        return SkipReason(f"no new complete set in {inbox} ({len(ready)} ready, all taken)")
    context.log.info(f"new image sets: {', '.join(new)}")
    return SensorResult(
        run_requests=[RunRequest(partition_key=name, run_key=f"image_set:{name}") for name in new],
        dynamic_partitions_requests=[image_set_partitions.build_add_request(new)],
        cursor=json.dumps(sorted(taken | set(new) | set(bad_names))),
    )


refresh_job = define_asset_job(
    "refresh_memory", selection=[memory_index, pruning_weights, evaluation],
    description="Fold newly embedded sets into a new index version, then evaluate it.",
)


@asset_sensor(asset_key=embeddings.key, job=refresh_job, default_status=DefaultSensorStatus.RUNNING,
              minimum_interval_seconds=10,
              description="After new embeddings land, folds them into a new index version and re-evaluates.")
def embeddings_sensor(context: SensorEvaluationContext, asset_event: EventLogEntry):
    # Not AutomationCondition.eager() on memory_index: eager waits until no partition of
    # embeddings is missing, so one image set whose run failed would keep every later set out
    # of the index (tested in tests/test_dagster_catalog.py); this sensor folds in what landed.
    # Each embeddings materialization is seen once (the sensor's cursor is the event id). One
    # refresh run folds in everything pending, so events that arrived together need one run.
    return RunRequest(run_key=f"embeddings:{asset_event.run_id}:{asset_event.timestamp}",
                      tags={"vismem/trigger": f"embeddings {asset_event.dagster_event.partition}"})


forget_job = define_asset_job(
    "forget", selection=[memory_index, pruning_weights, evaluation],
    description="Forget samples everywhere (typed run config: ops > memory_index > config > forget), then re-evaluate.",
)


@sensor(job=forget_job, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=10,
        description="Applies each JSON forget request dropped in $VISMEM_HOME/inbox/forget/ exactly once.")
def forget_request_sensor(context: SensorEvaluationContext, visual_memory: VisualMemory):
    inbox = Layout(resolve_home(visual_memory.home)).inbox_forget
    requests, rejected = [], []
    for path in sorted(inbox.glob("*.json")) if inbox.exists() else []:
        body = path.read_bytes()
        try:
            data = json.loads(body)
            ForgetRequest.from_dict(data).validate()
        except (ValueError, TypeError) as exc:  # JSONDecodeError and ForgetError are ValueErrors
            rejected.append(path.name)
            (inbox / "rejected").mkdir(exist_ok=True)
            (inbox / "rejected" / f"{path.name}.error.txt").write_text(f"{exc}\n")
            path.replace(inbox / "rejected" / path.name)
            context.log.warning(f"forget request {path.name} rejected: {exc}")
            continue
        digest = hashlib.sha256(body).hexdigest()
        requests.append(RunRequest(
            run_key=f"forget:{digest}",  # the same file content is applied once, whatever its name
            run_config={"ops": {"memory_index": {"config": {"forget": {**data, "request_file": str(path)}}}}},
            tags={"vismem/forget_request": path.name}))
    if not requests:
        return SkipReason(f"no forget request in {inbox}" + (f" ({len(rejected)} rejected)" if rejected else ""))
    return requests
