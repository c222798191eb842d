-- vismem ledger, version 7: file names leave DuckDB. A file name can be personal data, and
-- DuckDB keeps the old bytes of changed rows in its free blocks, so forgetting one meant
-- copying the whole ledger into a new file. Names now live in `names.bin` beside the ledger
-- (vismem_assets/names.py), erased in place when their sample is forgotten; each row holds
-- where its name lies, in bytes, NULL once forgotten. (The names a ledger held before move
-- there as this migration runs, and the `original_name` columns go.)
ALTER TABLE samples ADD COLUMN name_pos BIGINT;
ALTER TABLE samples ADD COLUMN name_len INTEGER;
ALTER TABLE sample_sources ADD COLUMN name_pos BIGINT;
ALTER TABLE sample_sources ADD COLUMN name_len INTEGER;
ALTER TABLE quarantine ADD COLUMN name_pos BIGINT;
ALTER TABLE quarantine ADD COLUMN name_len INTEGER;

-- A row's file name: `SELECT original_name(name_pos, name_len) FROM samples`. DuckDB finds
-- names.bin on `file_search_path` (the ledger sets the memory home; in the duckdb CLI, start
-- in the home).
CREATE MACRO original_name(name_pos, name_len) AS
    (SELECT CASE WHEN count(*) = 0
                 THEN error('no names.bin here: start the duckdb CLI in the memory home, or SET file_search_path to it')
                 ELSE first(decode(content[name_pos + 1 : name_pos + name_len])) END
     FROM read_blob('names.bin'));
