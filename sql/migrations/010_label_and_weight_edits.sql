-- vismem ledger, version 10: labels and vote weights edited by people (vismem relabel, vismem
-- weight, the Dagster `relabel` and `set_weights` jobs, inbox/relabel/ and inbox/weights/).
--
-- 1. `label_history` says who changed a label, from what, and why. Ingest rows keep
--    reason = 'ingest' and kind = 'ingest'; a relabel row has kind = 'relabel', the person's
--    reason, `old_label`, `requested_by`, and the `change_id` shared by the rows of one request.
ALTER TABLE label_history ADD COLUMN kind VARCHAR DEFAULT 'ingest';   -- 'ingest' | 'relabel'
ALTER TABLE label_history ADD COLUMN old_label VARCHAR;               -- NULL for ingest rows
ALTER TABLE label_history ADD COLUMN requested_by VARCHAR;            -- NULL for ingest rows
ALTER TABLE label_history ADD COLUMN change_id VARCHAR;               -- NULL for ingest rows

-- 2. A user weight per sample (none: 1). The vote of a neighbour is
--    strategy weight x pruning factor x user weight; 0 excludes the sample from every vote.
--    Keyed by sample, not by index version: it holds across adds, forgets and compactions.
CREATE TABLE user_weights (
    sample_id  VARCHAR PRIMARY KEY,
    weight     DOUBLE NOT NULL CHECK (weight >= 0 AND isfinite(weight)),
    change_id  VARCHAR NOT NULL,               -- the weight_history rows that set it
    set_at     TIMESTAMP NOT NULL
);

-- Every user weight change, append-only: old and new weight, who and why.
CREATE TABLE weight_history (
    change_id     VARCHAR NOT NULL,            -- one request: all its rows
    sample_id     VARCHAR NOT NULL,
    old_weight    DOUBLE NOT NULL,
    new_weight    DOUBLE NOT NULL,
    requested_by  VARCHAR NOT NULL,
    reason        VARCHAR NOT NULL,
    changed_at    TIMESTAMP NOT NULL
);
