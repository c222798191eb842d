-- Proof of forgetting for one sample: when it arrived, who asked to forget it and why, when
-- it was applied, which index versions were rewritten, and its place in the hash chain.
-- Parameter: sample_id (required). `vismem audit proof` adds a check of every file on disk.
SELECT s.sample_id,
       s.label,
       s.status,
       (SELECT min(arrived_at) FROM sample_sources src WHERE src.sample_id = s.sample_id) AS arrived_at,
       (SELECT string_agg(DISTINCT image_set, ', ') FROM sample_sources src WHERE src.sample_id = s.sample_id) AS arrived_with,
       d.request_id, d.requested_by, d.reason, d.category, d.external_ref,
       d.requested_at, d.applied_at, d.versions_rewritten, d.seq, d.prev_hash, d.row_hash,
       s.name_pos IS NULL AND s.image_path IS NULL AS name_and_path_redacted
FROM samples s
LEFT JOIN deletions d USING (sample_id)
WHERE s.sample_id = getvariable('sample_id');
