-- Labels changed by people (vismem relabel, the relabel job, inbox/relabel/), newest first: one
-- row per sample, with the old and new label, who asked, why and when; `change_id` groups the
-- rows of one request. Ingest rows (a sample's first label) are left out.
-- Parameters (duckdb CLI: SET VARIABLE name = value;): requested_by, label (old or new),
-- sample_id, from, to (all optional).
SELECT h.changed_at, h.requested_by, h.reason, h.old_label, h.label AS new_label, h.sample_id,
       s.label AS label_now, s.status, h.change_id
FROM label_history h
LEFT JOIN samples s USING (sample_id)
WHERE h.kind = 'relabel'
  AND (getvariable('requested_by') IS NULL OR h.requested_by = getvariable('requested_by'))
  AND (getvariable('label') IS NULL OR getvariable('label') IN (h.old_label, h.label))
  AND (getvariable('sample_id') IS NULL OR h.sample_id = getvariable('sample_id'))
  AND h.changed_at >= coalesce(getvariable('from')::TIMESTAMP, '-infinity'::TIMESTAMP)
  AND h.changed_at <  coalesce(getvariable('to')::TIMESTAMP, 'infinity'::TIMESTAMP)
ORDER BY h.changed_at DESC, h.change_id, h.sample_id;
