"""Editing the memory by hand: relabelling samples and setting their vote weights, with history.

Relabel (`vismem relabel`, the Dagster `relabel` job, `inbox/relabel/*.json`): in one ledger
transaction `samples.label` is set, one `label_history` row per sample records old and new
label, who, why and when (one `change_id` per request), and the stored reliability of every live
index version (pruning statistics, per k) is updated incrementally: no neighbour list moves (the
vectors are the same), so only the rows of the relabelled samples and of the samples whose top-k
holds one are counted again (reliability.relabel; equal to a full pass). Classification reads
labels from the ledger at every call (the catalog), so the next vote uses the new label.

Weights (`vismem weight`, the `set_weights` job, `inbox/weights/*.json`): a user weight W >= 0 per
sample (none set: 1), kept in `user_weights` with every change in `weight_history`. The rule:

    vote of a neighbour = strategy weight x pruning factor x user weight

(strategy weight: voting.py; pruning factor: 1 without pruning, 1.75 / (1 + v) soft, 0 or 1 hard).
W = 0 excludes the sample from every vote (it still takes its place among the k nearest, as a
hard-pruned one does); W = 1 undoes a weight. Pruning statistics do not depend on it.

Only active samples can be edited: a forgotten one is gone, a quarantined one never arrived.
Every refusal is an EditError (a ValueError) and changes nothing.
"""
from __future__ import annotations

import hashlib
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from .imagesets import LabelError, check_label, read_bounded
from .pruning import relabel_stored

if TYPE_CHECKING:
    from .home import Layout
    from .ledger import LedgerBase, Session

SHOWN = 5  # ids named in an error before "…"


class EditError(ValueError):
    """A relabel or weight request that cannot be applied as asked: nothing was changed."""


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EditError(f"the request needs {what}")
    return value.strip()


def _strings(value, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EditError(f"{what} must be a list of strings")
    return value


@dataclass
class _Targets:
    sample_ids: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)   # files: found by their content hash
    REQUIRED = ("requested_by", "reason")

    def _check_targets(self, kinds: list[str]) -> None:
        _strings(self.sample_ids, "sample_ids")
        _strings(self.images, "images")
        if len(kinds) != 1:
            raise EditError("say which samples with exactly one of: " + ", ".join(self._target_names()))

    @staticmethod
    def _target_names() -> list[str]:
        return ["sample ids", "image files"]

    @classmethod
    def from_dict(cls, data) -> "_Targets":
        """From JSON (an inbox file, run config): unknown or missing fields are refused by name."""
        if not isinstance(data, dict):
            raise EditError(f"a request is a JSON object, not {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise EditError(f"unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = [f for f in cls.REQUIRED if f not in data]
        if missing:
            raise EditError(f"missing field(s) {missing}; a request needs {', '.join(missing)}")
        return cls(**data)


@dataclass
class RelabelRequest(_Targets):
    to: str = ""
    requested_by: str = ""
    reason: str = ""
    label: str | None = None        # every active sample of this label
    REQUIRED = ("to", "requested_by", "reason")

    def validate(self) -> None:
        """Shape only (the memory is not read); `to` is normalised by the label rule."""
        self._check_targets([k for k, v in (("sample", self.sample_ids), ("image", self.images),
                                            ("label", self.label)) if v])
        if self.label is not None and not isinstance(self.label, str):
            raise EditError("label must be a string")
        self.requested_by = _text(self.requested_by, "requested_by (who asks)")
        self.reason = _text(self.reason, "a reason (why)")
        if not isinstance(self.to, str):
            raise EditError("to (the new label) must be a string")
        try:
            self.to = check_label(self.to)
        except LabelError as exc:  # its advice is for image sets; here the fix is another --to
            raise EditError(f"the new label: {str(exc).split('; fix it')[0]}; choose another --to") from None

    @staticmethod
    def _target_names() -> list[str]:
        return ["sample ids", "image files", "a label"]

    @property
    def target_kind(self) -> str:
        return "sample" if self.sample_ids else "image" if self.images else "label"


@dataclass
class WeightRequest(_Targets):
    weight: float = float("nan")
    requested_by: str = ""
    reason: str = ""
    REQUIRED = ("weight", "requested_by", "reason")

    def validate(self) -> None:
        self._check_targets([k for k, v in (("sample", self.sample_ids), ("image", self.images)) if v])
        self.requested_by = _text(self.requested_by, "requested_by (who asks)")
        self.reason = _text(self.reason, "a reason (why)")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight < 0:
            raise EditError(f"weight must be a finite number >= 0 (0 excludes the sample, 1 is the default), "
                            f"not {self.weight!r}")
        self.weight = float(self.weight)

    @property
    def target_kind(self) -> str:
        return "sample" if self.sample_ids else "image"


@dataclass
class EditReport:
    kind: str                       # 'relabel' or 'weight'
    dry_run: bool
    change_id: str | None           # None for a dry run
    changes: list[dict]             # sample_id, old, new
    unchanged: int = 0              # named, but already so
    new_label: bool = False         # relabel: a label the memory did not hold before
    reliability: list[dict] = field(default_factory=list)  # encoder_id, index_version, k, rows_recounted, v_changed

    @property
    def n_changed(self) -> int:
        return len(self.changes)

    def per_old_value(self) -> dict:
        out: dict = {}
        for c in self.changes:
            out[c["old"]] = out.get(c["old"], 0) + 1
        return dict(sorted(out.items(), key=lambda kv: str(kv[0])))

    def to_dict(self) -> dict:
        return {**asdict(self), "n_changed": self.n_changed}


# --- resolving what a request names -------------------------------------------------------------

def image_id(path: str | os.PathLike) -> str:
    """A sample id from an image file: the sha256 of its bytes (read as ingest reads them)."""
    try:
        return hashlib.sha256(read_bounded(path)).hexdigest()
    except OSError as exc:
        raise EditError(f"cannot read {path} to find its content hash: {exc.strerror or exc}") from None


def _listed(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (" …" if len(items) > SHOWN else "")


def _resolve(session: Session, request, verb: str) -> pl.DataFrame:
    """The active samples a request names (sample_id, vector_id, label), or an EditError naming
    what is unknown, forgotten or quarantined."""
    labels = session.labels
    kind = request.target_kind
    if kind == "label":
        found = labels.active_of_label(request.label)
        if found.is_empty():
            if labels.n_forgotten_of_label(request.label):
                raise EditError(f"every sample labelled {request.label!r} was forgotten: forgotten samples cannot be "
                                f"{verb}; nothing was changed")
            held = labels.active_labels()
            raise EditError(f"unknown label {request.label!r}: the memory holds {_listed(held) or 'no label yet'}; "
                            "nothing was changed")
        return found.drop("status")
    if kind == "image":
        wanted = {image_id(p): str(p) for p in request.images}
    else:
        wanted = {s.strip().lower(): s for s in request.sample_ids}
    found = labels.samples_by_id(list(wanted))
    what = "sample id" if kind == "sample" else "image (by content hash)"
    missing = [wanted[s] for s in wanted if s not in set(found["sample_id"])]
    if missing:
        hint = " (a sample id is the full 64-character sha256 of the image bytes)" if kind == "sample" else ""
        raise EditError(f"unknown {what}: {_listed(missing)}{hint}; nothing was changed")
    for status, why in (("forgotten", f"forgotten samples cannot be {verb} (they are gone from the memory)"),
                        ("quarantined", "quarantined files never entered the memory")):
        bad = found.filter(pl.col("status") == status)["sample_id"].to_list()
        if bad:
            raise EditError(f"{why}: {_listed([wanted[s] for s in bad])}; nothing was changed")
    return found.drop("status")


class Edits:
    """Relabels and user weights, each checked against the ledger and applied in one transaction."""

    def __init__(self, ledger: LedgerBase, layout: Layout):
        self.ledger, self.layout = ledger, layout

    def relabel(self, request: RelabelRequest, dry_run: bool = False) -> EditReport:
        """Give the samples a request names the label `request.to` (see the module's docstring)."""
        request.validate()
        if dry_run:
            with self.ledger.connect() as session:
                return _relabel_plan(session, request, dry_run=True)
        written: list[Path] = []
        try:
            with self.ledger.transaction() as session:
                report = _relabel_plan(session, request, dry_run=False)  # read again under the lock: what is there now
                session.labels.relabel(report.change_id, [c["sample_id"] for c in report.changes],
                                       [c["old"] for c in report.changes], request.to,
                                       requested_by=request.requested_by, reason=request.reason)
                update = relabel_stored(self.layout, session, [c["vector_id"] for c in report.changes],
                                        request.to, tag=report.change_id[:12])
                written = update.written
                report.reliability = update.runs
        except BaseException:
            for path in written:  # the ledger still names the files from before
                path.unlink(missing_ok=True)
            raise
        for path in update.replaced:
            path.unlink(missing_ok=True)
        for c in report.changes:
            c.pop("vector_id")
        return report

    def set_weights(self, request: WeightRequest, dry_run: bool = False) -> EditReport:
        """Give the samples a request names the user weight `request.weight` (module docstring)."""
        request.validate()
        if dry_run:
            with self.ledger.connect() as session:
                return _weight_plan(session, request, dry_run=True)
        with self.ledger.transaction() as session:
            report = _weight_plan(session, request, dry_run=False)
            session.labels.set_user_weights(report.change_id, [c["sample_id"] for c in report.changes],
                                            [c["old"] for c in report.changes], request.weight,
                                            requested_by=request.requested_by, reason=request.reason)
        return report


def _relabel_plan(session: Session, request: RelabelRequest, dry_run: bool) -> EditReport:
    found = _resolve(session, request, "relabelled")
    change = found.filter(pl.col("label") != request.to)
    if change.is_empty():
        raise EditError(f"nothing to change: the {len(found)} sample(s) named are already labelled {request.to!r}")
    held = session.labels.n_active_of_label(request.to)
    changes = [{"sample_id": r["sample_id"], "old": r["label"], "new": request.to,
                **({} if dry_run else {"vector_id": r["vector_id"]})} for r in change.iter_rows(named=True)]
    return EditReport("relabel", dry_run, None if dry_run else uuid.uuid4().hex, changes,
                      unchanged=len(found) - len(change), new_label=held == 0)


def _weight_plan(session: Session, request: WeightRequest, dry_run: bool) -> EditReport:
    found = _resolve(session, request, "weighted")
    current = session.labels.user_weights_of(found["sample_id"].to_list())
    changes = [{"sample_id": s, "old": current.get(s, 1.0), "new": request.weight}
               for s in found["sample_id"].to_list() if current.get(s, 1.0) != request.weight]
    if not changes:
        raise EditError(f"nothing to change: the {len(found)} sample(s) named already have weight {request.weight:g}")
    return EditReport("weight", dry_run, None if dry_run else uuid.uuid4().hex, changes,
                      unchanged=len(found) - len(changes))
