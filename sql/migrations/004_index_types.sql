-- vismem ledger, version 4: index types (exact flat, IVF-Flat, IVF-PQ) and what their builds measured.
ALTER TABLE index_versions ADD COLUMN nprobe INTEGER;              -- lists an IVF search visits (NULL: flat)
ALTER TABLE index_versions ADD COLUMN recall_at_10 DOUBLE;         -- against exact, on held-out memory vectors
ALTER TABLE index_versions ADD COLUMN recall_at_100 DOUBLE;
ALTER TABLE index_versions ADD COLUMN recall_measured_at INTEGER;  -- the version whose build measured it
ALTER TABLE index_versions ADD COLUMN build_reason VARCHAR;        -- why this index type, in words
ALTER TABLE index_versions ADD COLUMN build_report VARCHAR;        -- JSON: the build's choice, nprobe sweep, timings
