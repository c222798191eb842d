-- Deletions per requester, optionally within a period.
-- Parameters (duckdb CLI: SET VARIABLE name = value;): requested_by, from, to (all optional).
SELECT requested_by,
       count(DISTINCT request_id) AS requests,
       count(*)                   AS samples_forgotten,
       min(applied_at)            AS first_applied,
       max(applied_at)            AS last_applied
FROM deletions
WHERE (getvariable('requested_by') IS NULL OR requested_by = getvariable('requested_by'))
  AND applied_at >= coalesce(getvariable('from')::TIMESTAMP, '-infinity'::TIMESTAMP)
  AND applied_at <  coalesce(getvariable('to')::TIMESTAMP, 'infinity'::TIMESTAMP)
GROUP BY requested_by
ORDER BY samples_forgotten DESC, requested_by;
