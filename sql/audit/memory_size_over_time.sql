-- The memory's size over time: every index version with its operation and vector count,
-- both when it was written and now (a retained version loses forgotten vectors later).
SELECT v.created_at, v.encoder_id, v.version, v.operation,
       v.n_vectors + coalesce((SELECT sum(r.n_removed) FROM index_rewrites r
                               WHERE r.encoder_id = v.encoder_id AND r.version = v.version), 0) AS n_vectors_when_written,
       v.n_vectors AS n_vectors_now, v.n_added, v.n_removed, v.status
FROM index_versions v
ORDER BY v.created_at, v.encoder_id, v.version;
