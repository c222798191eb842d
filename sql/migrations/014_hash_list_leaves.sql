-- vismem ledger, version 14: hash lists of page hashes (vismem_assets/digests.py). A list with a
-- leaf_size has each block's digest as the sha256 of its leaves' digests (hex, one per line),
-- leaves of leaf_size bytes, so that an erasure hashes again only the pages it writes; a list
-- without one (0, or recorded before this version) has each block's digest of its bytes.
ALTER TABLE index_file_blocks ADD COLUMN leaf_size BIGINT DEFAULT 0;
