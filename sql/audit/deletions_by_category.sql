-- Deletions per reason category (gdpr, license, quality, bias, other; NULL = none given).
-- Parameters: from, to (optional).
SELECT coalesce(category, '(none)') AS category,
       count(DISTINCT request_id)   AS requests,
       count(*)                     AS samples_forgotten,
       count(DISTINCT label)        AS labels_touched
FROM deletions
WHERE applied_at >= coalesce(getvariable('from')::TIMESTAMP, '-infinity'::TIMESTAMP)
  AND applied_at <  coalesce(getvariable('to')::TIMESTAMP, 'infinity'::TIMESTAMP)
GROUP BY 1
ORDER BY samples_forgotten DESC;
