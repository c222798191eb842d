-- Every index version with its parent and delta: how the live index came to be.
SELECT encoder_id, version, parent_version, operation, status, n_vectors, n_added, n_removed, sha256, path, created_at
FROM index_versions
ORDER BY encoder_id, version;
