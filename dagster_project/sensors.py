"""Sensors: new image sets in the inbox, and new embeddings folded into the index.
A tick only lists folders; all heavy work happens in the runs it requests."""

import hashlib
import json
import sys

from dagster import (
    DagsterConfigMappingFunctionError,
    DefaultSensorStatus,
    EventLogEntry,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    asset_sensor,
    config_mapping,
    sensor,
)

from vismem_assets.forgetting import REQUEST_EXAMPLE, ForgetError, ForgetReport, ForgetRequest
from vismem_assets.home import Layout
from vismem_assets.imagesets import SET_NAME

from .assets import (
    ForgetConfig,
    archive_request_file,
    embeddings,
    evaluation,
    image_set_partitions,
    image_sets,
    memory_index,
    pruning_weights,
)
from .deployment import DEPLOYMENT
from .resources import VISUAL_MEMORY, VisualMemory

READY_MARKER = "_READY"

ingest_job = define_asset_job(
    "ingest_image_set", selection=[image_sets, embeddings],
    # The embedded default: both steps in one process, so the model loads once per run. The cluster
    # profile: encode steps on the embedding workers, each loading the model once (deployment.py).
    executor_def=DEPLOYMENT.executor(),
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
    inbox = Layout(visual_memory.home_path()).inbox_sets
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


@config_mapping
def forget_request_config(request: ForgetConfig) -> dict:
    """The forget job's run config is one request (its required fields are what the Launchpad
    scaffolds), checked against the memory when the run is created: a request naming what the
    memory never held is refused at launch, with what to fix, and no run touches an asset.
    Only facts that stay true are checked here (this also runs when the run starts); "already
    forgotten" is checked by the sensor, and again by memory_index before it changes anything."""
    # No resources in a config mapping: the memory of the resource definitions.py binds.
    memory = VISUAL_MEMORY.memory()
    try:
        memory.forgetting.resolve(request.request())
    except ForgetError as exc:  # raised as Dagster would wrap it, with the reason as its message
        raise DagsterConfigMappingFunctionError(f"forget request refused (no run was created): {exc}",
                                                user_exception=exc, original_exc_info=sys.exc_info()) from exc
    forget = {k: v for k, v in request.model_dump().items() if v is not None}
    return {"ops": {"memory_index": {"config": {"forget": forget}}}}


forget_job = define_asset_job(
    "forget", selection=[memory_index, pruning_weights, evaluation], config=forget_request_config,
    description="Forget samples everywhere, then re-evaluate. Run config: one request (requested_by, reason, "
                "exactly one of label / image_set / sample_ids / images; dry_run to see what it would forget).",
)

MAX_REQUEST_BYTES = 8 << 20  # a request file is a few ids at most; never read a huge file into a tick


def read_request(path) -> tuple[dict, ForgetReport, bytes]:
    """An inbox file as a request the memory can apply, or a ForgetError saying what to fix."""
    if path.is_symlink() or not path.is_file():
        raise ForgetError("not a regular file: put the request itself in the inbox, not a link or a pipe")
    if path.stat().st_size > MAX_REQUEST_BYTES:
        raise ForgetError(f"{path.stat().st_size} bytes: a request file holds at most {MAX_REQUEST_BYTES} bytes; "
                          "split a long list of sample ids over several requests")
    body = path.read_bytes()
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ForgetError(f"not valid JSON ({exc}); write it as {REQUEST_EXAMPLE}") from None
    return data, ForgetRequest.from_dict(data), body


@sensor(job=forget_job, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=10,
        description="Applies each JSON forget request dropped in $VISMEM_HOME/inbox/forget/ exactly once, "
                    "after checking it against the memory; a bad one goes to rejected/ with its .error.txt.")
def forget_request_sensor(context: SensorEvaluationContext, visual_memory: VisualMemory):
    inbox = Layout(visual_memory.home_path()).inbox_forget
    memory = visual_memory.memory()
    requests, rejected = [], []
    for path in sorted(inbox.glob("*.json")) if inbox.exists() else []:
        try:
            # Checked before a run exists: a bad request never starts (nor fails) a run of the assets.
            data, request, body = read_request(path)
            plan = memory.forgetting.check(request)
        except ForgetError as exc:
            rejected.append(path.name)
            archive_request_file(str(path), "rejected", error=str(exc))
            context.log.warning(f"forget request {path.name} rejected: {exc} "
                                f"(moved to inbox/forget/rejected/, with {path.name}.error.txt)")
            continue
        context.log.info(f"forget request {path.name}: {plan.n_samples} sample(s) "
                         f"({', '.join(f'{k}: {v}' for k, v in plan.per_label().items())}); launching the forget job")
        config = {k: v for k, v in data.items() if v is not None}
        requests.append(RunRequest(
            run_key=f"forget:{hashlib.sha256(body).hexdigest()}",  # the same content is applied once, whatever its name
            run_config={**config, "request_file": str(path)},
            tags={"vismem/forget_request": path.name}))
    if not requests:
        return SkipReason(f"no forget request in {inbox}" + (f" ({len(rejected)} rejected: {', '.join(rejected)})"
                                                              if rejected else ""))
    return requests
