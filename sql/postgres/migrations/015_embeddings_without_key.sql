-- vismem ledger, version 15, PostgreSQL: nothing to do. DuckDB dropped the key of `embeddings`
-- here, whose ART index cost its forgets ~0.3 s; PostgreSQL's B-tree key costs a forget no such
-- rewrite, and it keeps enforcing one row per (encoder, sample).
SELECT 1;
