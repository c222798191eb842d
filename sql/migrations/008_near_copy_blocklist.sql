-- vismem ledger, version 8: the blocklist holds more than `samples` rows.
--
-- 1. A perceptual hash of each forgotten image (vismem_assets/near_copies.py), computed when the
--    forget request is accepted, before its bytes are erased: ingest refuses near-copies of a
--    forgotten image (re-encoded, as JPEG, a pixel changed), not only its exact bytes. One row
--    per forgotten sample; `phash` is NULL when there was no decodable image to hash (an
--    unreadable or non-image file, or a sample forgotten before this migration), and `note`
--    says why. These rows stay after forgetting, by design, as the sha256 does.
-- 2. The `blocklist` view also takes its hashes from the hash-chained `deletions` and from
--    `forget_targets`, so deleting a forgotten sample's `samples` row by hand does not let its
--    bytes back in (and `vismem audit verify` reports the missing row).
CREATE TABLE blocklist_phashes (
    sample_id   VARCHAR PRIMARY KEY,
    request_id  VARCHAR,                -- the forget request that put it here
    algorithm   VARCHAR NOT NULL,       -- how it was computed (near_copies.ALGORITHM)
    phash       VARCHAR,                -- hex; NULL when nothing could be hashed (see note)
    note        VARCHAR NOT NULL,
    created_at  TIMESTAMP NOT NULL
);

INSERT INTO blocklist_phashes
    SELECT s.sample_id, (SELECT min(t.request_id) FROM forget_targets t WHERE t.sample_id = s.sample_id),
           'none', NULL, 'forgotten before perceptual hashes were kept (ledger migration 8): exact bytes only', now()
    FROM samples s WHERE s.status = 'forgotten';

CREATE OR REPLACE VIEW blocklist AS
    WITH ids AS (SELECT sample_id FROM samples WHERE status = 'forgotten'
                 UNION SELECT sample_id FROM deletions
                 UNION SELECT sample_id FROM forget_targets)
    SELECT i.sample_id, coalesce(s.label, d.label) AS label, coalesce(d.request_id, t.request_id) AS request_id,
           d.applied_at, p.phash
    FROM ids i
    LEFT JOIN samples s USING (sample_id)
    LEFT JOIN (SELECT sample_id, min(request_id) AS request_id, min(applied_at) AS applied_at, min(label) AS label
               FROM deletions GROUP BY sample_id) d USING (sample_id)
    LEFT JOIN (SELECT sample_id, min(request_id) AS request_id FROM forget_targets GROUP BY sample_id) t USING (sample_id)
    LEFT JOIN blocklist_phashes p USING (sample_id);
