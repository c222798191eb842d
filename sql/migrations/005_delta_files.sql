-- vismem ledger, version 5: a version is a list of files: its base (one file, or shards of an
-- exact index) and the delta files adds appended to it. An add of a few vectors writes only
-- them; forgetting rewrites only the files that hold a forgotten vector. `path`/`sha256` stay
-- the first file; `files` lists them all (NULL: a version from before, its one file).
ALTER TABLE index_versions ADD COLUMN files VARCHAR;      -- JSON [{path, sha256, n_vectors, role}]
ALTER TABLE index_rewrites ADD COLUMN old_path VARCHAR;   -- which file of the version was rewritten
ALTER TABLE index_rewrites ADD COLUMN new_path VARCHAR;
