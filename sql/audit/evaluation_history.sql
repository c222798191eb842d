-- The memory's history of accuracy: top-1 of every evaluation at one strategy and k (defaults
-- rank and 20), with no, soft and hard pruning, by index version.
-- Parameters (optional): strategy, k, query_set.
SELECT e.created_at, e.encoder_id, e.index_version, e.query_set, e.n_queries,
       max(CASE WHEN e.pruning = 'none' THEN e.accuracy END) AS top1,
       max(CASE WHEN e.pruning = 'soft' THEN e.accuracy END) AS top1_soft_pruning,
       max(CASE WHEN e.pruning = 'hard' THEN e.accuracy END) AS top1_hard_pruning,
       v.n_vectors
FROM evaluations e
LEFT JOIN index_versions v ON v.encoder_id = e.encoder_id AND v.version = e.index_version
WHERE e.strategy = coalesce(getvariable('strategy'), 'rank')
  AND e.k = coalesce(getvariable('k')::INTEGER, 20)
  AND (getvariable('query_set') IS NULL OR e.query_set = getvariable('query_set'))
GROUP BY e.evaluation_id, e.created_at, e.encoder_id, e.index_version, e.query_set, e.n_queries, v.n_vectors
ORDER BY e.created_at;
