-- vismem ledger, version 9: a file name need not be UTF-8. names.bin keeps a name's original
-- bytes (a file called b"\xff\xfe.png" is data, not an error), and DuckDB's decode() refuses
-- such bytes, which broke every query reading that name (the audit queries in sql/audit/).
-- A name that is not UTF-8 now reads as its bytes with the non-ASCII ones escaped (\xFF).
CREATE OR REPLACE MACRO original_name(name_pos, name_len) AS
    (SELECT CASE WHEN count(*) = 0
                 THEN error('no names.bin here: start the duckdb CLI in the memory home, or SET file_search_path to it')
                 ELSE first(coalesce(try(decode(content[name_pos + 1 : name_pos + name_len])),
                                     content[name_pos + 1 : name_pos + name_len]::VARCHAR)) END
     FROM read_blob('names.bin'));
