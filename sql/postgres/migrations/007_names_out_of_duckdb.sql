-- vismem ledger, version 7, PostgreSQL: file names live in names.bin in the memory home, not in
-- the database (PostgreSQL keeps dead tuples and WAL, as DuckDB keeps old bytes); each row holds
-- where its name lies, in bytes, NULL once forgotten. A PostgreSQL ledger is born after this
-- version, so it has no names to move: the `original_name` columns just go.
ALTER TABLE samples ADD COLUMN name_pos BIGINT;
ALTER TABLE samples ADD COLUMN name_len INTEGER;
ALTER TABLE sample_sources ADD COLUMN name_pos BIGINT;
ALTER TABLE sample_sources ADD COLUMN name_len INTEGER;
ALTER TABLE quarantine ADD COLUMN name_pos BIGINT;
ALTER TABLE quarantine ADD COLUMN name_len INTEGER;
ALTER TABLE samples DROP COLUMN original_name;
ALTER TABLE sample_sources DROP COLUMN original_name;
ALTER TABLE quarantine DROP COLUMN original_name;

-- The functions the audit queries in sql/audit/ call, which DuckDB has built in or as a macro,
-- so that the same files run in psql and in the duckdb CLI.

-- A row's file name: `SELECT original_name(name_pos, name_len) FROM samples`. The server reads
-- names.bin from the path in the setting vismem.names_file (the ledger sets it on each
-- connection; in psql: SET vismem.names_file = '/shared/home/names.bin'). The server must see
-- the shared home, and the role needs pg_read_server_files. A name that is not UTF-8 reads as
-- its bytes, escaped.
CREATE FUNCTION original_name(name_pos BIGINT, name_len INTEGER) RETURNS VARCHAR
LANGUAGE plpgsql STABLE AS $$
DECLARE
    names_file TEXT := nullif(current_setting('vismem.names_file', true), '');
    raw BYTEA;
BEGIN
    IF name_pos IS NULL OR name_len IS NULL THEN
        RETURN NULL;
    END IF;
    IF names_file IS NULL THEN
        RAISE EXCEPTION 'no names.bin named: SET vismem.names_file to the names.bin in the memory home';
    END IF;
    raw := pg_read_binary_file(names_file, name_pos, name_len);
    BEGIN
        RETURN convert_from(raw, 'UTF8');
    EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
        RETURN encode(raw, 'escape');
    END;
END $$;

-- An audit query's parameter: `SET vismem.sample_id = '...'` in psql (run_named sets them the
-- same way); unset or empty reads as NULL, as DuckDB's getvariable() of an unset variable.
CREATE FUNCTION getvariable(name VARCHAR) RETURNS VARCHAR
LANGUAGE sql STABLE AS $$ SELECT nullif(current_setting('vismem.' || name, true), '') $$;

-- DuckDB's isfinite() of a number (migration 010's CHECK); PostgreSQL has it for dates only.
CREATE FUNCTION isfinite(x DOUBLE PRECISION) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $$ SELECT x <> 'NaN' AND x <> 'Infinity' AND x <> '-Infinity' $$;
