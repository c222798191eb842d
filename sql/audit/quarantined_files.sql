-- Files that were refused, newest first, with the reason.
SELECT q.quarantined_at, q.image_set, coalesce(original_name(q.name_pos, q.name_len), '[redacted]') AS original_name, q.reason, q.sample_id, q.stored_path
FROM quarantine q
ORDER BY q.quarantined_at DESC;
