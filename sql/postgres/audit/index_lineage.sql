-- Every index version with its parent and delta: how the live index came to be, of which type,
-- and the recall its build measured against exact search (NULL: exact). `path` is its first
-- file; `n_files` how many it has (`index_versions.files`, JSON: path, sha256, n_vectors, role =
-- base shard or an add's delta, holes); `holes` the forgotten vectors erased in place in them,
-- which the next compaction writes away. (PostgreSQL's twin of sql/audit/index_lineage.sql.)
SELECT encoder_id, version, parent_version, operation, status, index_type, nprobe, recall_at_10, recall_at_100,
       recall_measured_at, n_vectors, n_added, n_removed, sha256, path,
       coalesce(json_array_length(CAST(files AS JSON)), 1) AS n_files,
       (SELECT coalesce(sum(coalesce((f ->> 'holes')::BIGINT, 0)), 0)::BIGINT
        FROM json_array_elements(CAST(files AS JSON)) f) AS holes,
       created_at
FROM index_versions
ORDER BY encoder_id, version;
