-- vismem ledger, version 5: a version is a base file plus delta files. An add of a few vectors
-- writes only them (a delta file) instead of the whole index again; a fold or a compaction
-- writes a new base. `path`/`sha256` stay the base file; `deltas` lists the others, in order.
ALTER TABLE index_versions ADD COLUMN deltas VARCHAR DEFAULT '[]';  -- JSON [{path, sha256, n_vectors}]
ALTER TABLE index_rewrites ADD COLUMN old_path VARCHAR;             -- which file of the version was rewritten
ALTER TABLE index_rewrites ADD COLUMN new_path VARCHAR;
