-- vismem ledger, version 9, PostgreSQL: nothing to do. DuckDB's original_name() macro learned
-- here to read a name that is not UTF-8; PostgreSQL's original_name() (version 7) always could.
SELECT 1;
