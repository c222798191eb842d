"""Editing labels and vote weights from Dagster: the `relabel` and `set_weights` jobs (typed run
config, so a person can edit from the Launchpad) and a sensor per inbox folder
($VISMEM_HOME/inbox/relabel/, inbox/weights/). The work is the core's (vismem_assets/relabel.py).

`sample_labels` -> pruning_weights -> evaluation: a relabel changes reliability, then accuracy.
`user_weights` -> evaluation: a weight changes votes, not reliability.
With `dry_run`, the edit asset only reports what would change (an observation) and materializes
nothing, so the steps after it are skipped.
"""

import hashlib
import json
from pathlib import Path

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetObservation,
    Config,
    DefaultSensorStatus,
    Failure,
    MaterializeResult,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    asset,
    define_asset_job,
    sensor,
)
from pydantic import Field

from vismem_assets.home import Layout
from vismem_assets.relabel import EditReport, Edits, RelabelRequest, WeightRequest

from .assets import LEDGER_POOL, catalog_entry, evaluation, pruning_weights
from .metadata import table, text
from .resources import VisualMemory

SAMPLE_LABELS, USER_WEIGHTS = "sample_labels", "user_weights"


class RelabelConfig(Config):
    """A relabel request, as typed run config (the Launchpad form, or a file in inbox/relabel/)."""
    to: str = Field(description="the new label (the label rule of image sets applies)")
    requested_by: str = Field(description="who asks")
    reason: str = Field(description="why, in free text")
    sample_ids: list[str] = Field(default=[], description="sample ids (sha256 of the image bytes)")
    images: list[str] = Field(default=[], description="image files, matched by content")
    label: str | None = Field(default=None, description="relabel every active sample of this label")
    dry_run: bool = Field(default=False, description="report what would change; change nothing")
    request_file: str | None = Field(default=None, description="inbox file it came from; archived once applied")

    def request(self) -> RelabelRequest:
        return RelabelRequest(**self.model_dump(exclude={"dry_run", "request_file"}))


class WeightConfig(Config):
    """A user weight request (vote = strategy weight x pruning factor x user weight; 0 excludes)."""
    weight: float = Field(description="the user weight, >= 0 (0 excludes the samples from every vote, 1 is the default)")
    requested_by: str = Field(description="who asks")
    reason: str = Field(description="why, in free text")
    sample_ids: list[str] = Field(default=[], description="sample ids (sha256 of the image bytes)")
    images: list[str] = Field(default=[], description="image files, matched by content")
    dry_run: bool = Field(default=False, description="report what would change; change nothing")
    request_file: str | None = Field(default=None, description="inbox file it came from; archived once applied")

    def request(self) -> WeightRequest:
        return WeightRequest(**self.model_dump(exclude={"dry_run", "request_file"}))


def archive(path: str | None, outcome: str, error: str | None = None) -> None:
    """Move an inbox request to <inbox>/<outcome>/ so it is never taken again (with why, if rejected)."""
    if path and Path(path).exists():
        folder = Path(path).parent / outcome
        folder.mkdir(exist_ok=True)
        if error is not None:
            (folder / f"{Path(path).name}.error.txt").write_text(f"{error}\n")
        Path(path).replace(folder / Path(path).name)


def _edit(config, apply, asset_name: str, memory):
    """Apply (or, dry, plan) an edit; a refused request fails this step alone, with its reason."""
    try:
        report = apply(memory.edits, config.request(), dry_run=config.dry_run)
    except ValueError as exc:  # EditError: nothing was changed
        archive(config.request_file, "rejected", str(exc))
        raise Failure(description=f"{asset_name}: request refused, nothing changed: {exc}") from None
    if not config.dry_run:
        archive(config.request_file, "applied")
    return report


def _changes(report: EditReport) -> dict:
    shown = pl.DataFrame(report.changes, schema={"sample_id": pl.String, "old": pl.String, "new": pl.String})
    return {"changed": report.n_changed, "unchanged": report.unchanged,
            "change_id": text(report.change_id or "dry run"), "samples": table(shown)}


@asset(pool=LEDGER_POOL, group_name="editing", output_required=False,
       **catalog_entry("edit", {"duckdb"}, "1"),
       description="The samples' labels as people edited them (label_history): a materialization is one relabel, "
                   "with the stored reliability of the live index brought up to date incrementally.")
def sample_labels(context: AssetExecutionContext, config: RelabelConfig, visual_memory: VisualMemory):
    report = _edit(config, Edits.relabel, SAMPLE_LABELS, visual_memory.memory())
    per_label = pl.DataFrame({"old_label": list(report.per_old_value()), "samples": list(report.per_old_value().values())})
    metadata = {**_changes(report), "to": text(config.to), "new_label": text("yes" if report.new_label else "no"),
                "requested_by": text(config.requested_by), "reason": text(config.reason),
                "per_old_label": table(per_label)}
    if config.dry_run:
        context.log.info(f"dry run: {report.n_changed} sample(s) would be relabelled {config.to!r}; nothing changed")
        yield AssetObservation(asset_key=context.asset_key, metadata={**metadata, "dry_run": text("yes")})
        return
    context.log.info(f"relabelled {report.n_changed} sample(s) {config.to!r} (change {report.change_id[:12]})")
    yield MaterializeResult(metadata={**metadata, "reliability": table(pl.DataFrame(
        report.reliability, schema={"encoder_id": pl.String, "index_version": pl.Int64, "k": pl.Int64,
                                    "rows_recounted": pl.Int64, "v_changed": pl.Int64}))})


@asset(pool=LEDGER_POOL, group_name="editing", output_required=False,
       **catalog_entry("edit", {"duckdb"}, "1"),
       description="User vote weights as people set them (user_weights, weight_history): the vote of a neighbour "
                   "is strategy weight x pruning factor x user weight; 0 excludes a sample.")
def user_weights(context: AssetExecutionContext, config: WeightConfig, visual_memory: VisualMemory):
    report = _edit(config, Edits.set_weights, USER_WEIGHTS, visual_memory.memory())
    report.changes = [{**c, "old": f"{c['old']:g}", "new": f"{c['new']:g}"} for c in report.changes]
    metadata = {**_changes(report), "weight": text(f"{config.weight:g}"), "requested_by": text(config.requested_by),
                "reason": text(config.reason)}
    if config.dry_run:
        context.log.info(f"dry run: {report.n_changed} sample(s) would get weight {config.weight:g}; nothing changed")
        yield AssetObservation(asset_key=context.asset_key, metadata={**metadata, "dry_run": text("yes")})
        return
    context.log.info(f"set weight {config.weight:g} on {report.n_changed} sample(s) (change {report.change_id[:12]})")
    yield MaterializeResult(metadata=metadata)


relabel_job = define_asset_job(
    "relabel", selection=[sample_labels, pruning_weights, evaluation],
    description="Relabel samples (typed run config: ops > sample_labels > config), then bring pruning up to date "
                "and re-evaluate.",
)
set_weights_job = define_asset_job(
    "set_weights", selection=[user_weights, evaluation],
    description="Set user vote weights (typed run config: ops > user_weights > config), then re-evaluate.",
)


def _inbox_sensor(context: SensorEvaluationContext, inbox: Path, kind: str, request_type, apply, asset_name: str,
                  memory) -> list[RunRequest] | SkipReason:
    """Each JSON file: checked against the memory (a dry run) before a run is launched; a bad one
    goes to rejected/ with its .error.txt, and is said in the sensor's log."""
    runs, rejected = [], 0
    for path in sorted(inbox.glob("*.json")) if inbox.exists() else []:
        body = path.read_bytes()
        try:
            data = json.loads(body)
            apply(memory.edits, request_type.from_dict(data), dry_run=True)
        except (ValueError, TypeError) as exc:  # JSONDecodeError and EditError are ValueErrors
            rejected += 1
            archive(str(path), "rejected", str(exc))
            context.log.warning(f"{kind} request {path.name} rejected: {exc}")
            continue
        runs.append(RunRequest(
            run_key=f"{kind}:{hashlib.sha256(body).hexdigest()}",  # the same content is applied once
            run_config={"ops": {asset_name: {"config": {**data, "request_file": str(path)}}}},
            tags={f"vismem/{kind}_request": path.name}))
    if not runs:
        return SkipReason(f"no {kind} request in {inbox}" + (f" ({rejected} rejected)" if rejected else ""))
    return runs


@sensor(job=relabel_job, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=10,
        description="Applies each JSON relabel request dropped in $VISMEM_HOME/inbox/relabel/ once "
                    '({"label": "Shirt", "to": "Top", "requested_by": "...", "reason": "..."}; '
                    "or sample_ids / images); checked against the memory first, bad ones go to rejected/.")
def relabel_request_sensor(context: SensorEvaluationContext, visual_memory: VisualMemory):
    memory = visual_memory.memory()
    return _inbox_sensor(context, Layout(visual_memory.home_path()).inbox_relabel, "relabel", RelabelRequest,
                         Edits.relabel, SAMPLE_LABELS, memory)


@sensor(job=set_weights_job, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=10,
        description="Applies each JSON weight request dropped in $VISMEM_HOME/inbox/weights/ once "
                    '({"sample_ids": ["..."], "weight": 0, "requested_by": "...", "reason": "..."}); '
                    "checked against the memory first, bad ones go to rejected/.")
def weight_request_sensor(context: SensorEvaluationContext, visual_memory: VisualMemory):
    memory = visual_memory.memory()
    return _inbox_sensor(context, Layout(visual_memory.home_path()).inbox_weights, "weights", WeightRequest,
                         Edits.set_weights, USER_WEIGHTS, memory)
