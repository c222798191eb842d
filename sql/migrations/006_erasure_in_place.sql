-- vismem ledger, version 6: forgetting erases in place. Each index file that holds a forgotten
-- vector keeps its name; the vector's bytes and its id are overwritten there (a hole, id -1,
-- that readers drop and the next compaction writes away), and the file gets a new sha256,
-- recorded here and in every version naming it before a byte changes. One row per file and
-- request. (`index_versions.files` counts each file's holes; retained versions still get an
-- `index_rewrites` row per file, with old_path = new_path.)
CREATE TABLE index_erasures (
    encoder_id  VARCHAR NOT NULL,
    path        VARCHAR NOT NULL,      -- the index file, relative to the memory home
    request_id  VARCHAR NOT NULL,
    n_erased    BIGINT NOT NULL,
    old_sha256  VARCHAR NOT NULL,
    new_sha256  VARCHAR NOT NULL,
    erased_at   TIMESTAMP NOT NULL
);
