-- vismem ledger, version 2: forgetting with proof.

-- One row per forget request; 'pending' until every trace is gone (a crash leaves it pending,
-- and the next `vismem forget --resume` or forget run finishes it).
CREATE TABLE forget_requests (
    request_id    VARCHAR PRIMARY KEY,          -- sha256 of the canonical request
    requested_by  VARCHAR NOT NULL,
    reason        VARCHAR NOT NULL,
    category      VARCHAR,                      -- gdpr, license, quality, bias, ...
    external_ref  VARCHAR,
    target_kind   VARCHAR NOT NULL,             -- sample, image, label, image_set
    target        VARCHAR NOT NULL,             -- JSON: what was asked for
    requested_at  TIMESTAMP NOT NULL,
    applied_at    TIMESTAMP,
    state         VARCHAR NOT NULL CHECK (state IN ('pending', 'applied')),
    n_samples     INTEGER NOT NULL
);

-- The samples a request resolved to, fixed when it was accepted.
CREATE TABLE forget_targets (
    request_id  VARCHAR NOT NULL,
    sample_id   VARCHAR NOT NULL,
    vector_id   BIGINT
);

-- Append-only, hash-chained: row_hash = sha256(prev_hash || canonical row). Changing,
-- deleting or reordering a row breaks the chain; index manifests carry the head, so
-- truncating the tail is caught too.
CREATE TABLE deletions (
    seq                 BIGINT PRIMARY KEY,
    request_id          VARCHAR NOT NULL,
    sample_id           VARCHAR NOT NULL,
    label               VARCHAR,
    requested_by        VARCHAR NOT NULL,
    reason              VARCHAR NOT NULL,
    category            VARCHAR,
    external_ref        VARCHAR,
    requested_at        TIMESTAMP NOT NULL,
    applied_at          TIMESTAMP NOT NULL,
    versions_rewritten  VARCHAR NOT NULL,       -- JSON list of "encoder-slug:version"
    prev_hash           VARCHAR NOT NULL,
    row_hash            VARCHAR NOT NULL
);

-- Every retained index version rewritten without forgotten vectors: old and new bytes.
CREATE TABLE index_rewrites (
    encoder_id    VARCHAR NOT NULL,
    version       INTEGER NOT NULL,
    request_id    VARCHAR NOT NULL,
    old_sha256    VARCHAR NOT NULL,
    new_sha256    VARCHAR NOT NULL,
    n_removed     BIGINT NOT NULL,
    rewritten_at  TIMESTAMP NOT NULL
);

ALTER TABLE index_versions ADD COLUMN chain_head VARCHAR;   -- deletions chain head when written

-- Hashes that may never come back: re-ingesting them is refused and reported as blocked.
CREATE VIEW blocklist AS
    SELECT s.sample_id, s.label, d.request_id, d.applied_at
    FROM samples s LEFT JOIN (SELECT sample_id, min(request_id) AS request_id, min(applied_at) AS applied_at
                              FROM deletions GROUP BY sample_id) d USING (sample_id)
    WHERE s.status = 'forgotten';
