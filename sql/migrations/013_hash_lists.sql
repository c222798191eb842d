-- vismem ledger, version 13: index file digests as hash lists (vismem_assets/digests.py). A file
-- whose entry in index_versions.files has a block_size is recorded by the sha256 of its hash list
-- (each block's sha256, hex, one per line); without one (files written before this version) by
-- the plain sha256 of its bytes, until an erasure gives it a list. The list is kept here, once per
-- file and digest, so that an erasure re-hashes only the blocks it touches and a check can say
-- which blocks differ. index_erasures' digests are of the same kind as the file's.
CREATE TABLE index_file_blocks (
    encoder_id  VARCHAR NOT NULL,
    path        VARCHAR NOT NULL,   -- the index file, relative to the memory home
    sha256      VARCHAR NOT NULL,   -- of the list: what index_versions.files records
    block_size  BIGINT NOT NULL,
    blocks      VARCHAR NOT NULL,   -- each block's sha256, hex, concatenated
    PRIMARY KEY (path, sha256)
);
