-- vismem ledger, version 11: the deletions chain cannot fork. Each row names the hash of the row
-- before it; two rows naming the same one would be two chains from one point (two writers that
-- both read the same tail), and the second is refused. (One writer at a time already makes this
-- so: the DuckDB file's lock, PostgreSQL's advisory lock; the constraint holds it in the data.)
CREATE UNIQUE INDEX deletions_prev_hash ON deletions (prev_hash);
