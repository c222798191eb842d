-- vismem ledger, version 12: a memory in S shards by sample id. A version names every shard's
-- files (its `files` JSON gives each file's shard: 0 when absent) and says how many shards its
-- memory has; S = 1 is a memory as it was. A forget fans out to the shards: each (encoder,
-- shard) erases its own files and reports here; the request stays pending until every shard
-- holding files of a version that is not purged has reported.
ALTER TABLE index_versions ADD COLUMN n_shards INTEGER DEFAULT 1;
CREATE TABLE forget_shard_reports (
    request_id   VARCHAR NOT NULL,
    encoder_id   VARCHAR NOT NULL,
    n_shards     INTEGER NOT NULL,   -- the sharding the shard belongs to
    shard        INTEGER NOT NULL,
    n_erased     BIGINT NOT NULL,    -- entries erased in its files (all versions)
    reported_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (request_id, encoder_id, n_shards, shard)
);
