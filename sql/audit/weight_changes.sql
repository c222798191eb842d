-- User weights changed by people (vismem weight, the set_weights job, inbox/weights/), newest
-- first: one row per sample, with the old and new weight, who asked, why and when, the sample's
-- label and the weight it votes with now (the vote of a neighbour is strategy weight x pruning
-- factor x user weight; 0 excludes it). `change_id` groups the rows of one request.
-- Parameters (duckdb CLI: SET VARIABLE name = value;): requested_by, sample_id, from, to (all optional).
SELECT h.changed_at, h.requested_by, h.reason, h.old_weight, h.new_weight, h.sample_id, s.label,
       coalesce(w.weight, 1.0) AS weight_now, s.status, h.change_id
FROM weight_history h
LEFT JOIN samples s USING (sample_id)
LEFT JOIN user_weights w USING (sample_id)
WHERE (getvariable('requested_by') IS NULL OR h.requested_by = getvariable('requested_by'))
  AND (getvariable('sample_id') IS NULL OR h.sample_id = getvariable('sample_id'))
  AND h.changed_at >= coalesce(getvariable('from')::TIMESTAMP, '-infinity'::TIMESTAMP)
  AND h.changed_at <  coalesce(getvariable('to')::TIMESTAMP, 'infinity'::TIMESTAMP)
ORDER BY h.changed_at DESC, h.change_id, h.sample_id;
