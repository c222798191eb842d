-- vismem ledger, version 3: reliability and pruning weights, novelty, richer evaluations.

-- Reliability v of each sample (how often it appears, with another label, among the top-k of
-- the other samples), per index version and k. Full passes and incremental updates are logged.
CREATE TABLE reliability (
    encoder_id     VARCHAR NOT NULL,
    index_version  INTEGER NOT NULL,
    k              INTEGER NOT NULL,
    vector_id      BIGINT NOT NULL,
    v              INTEGER NOT NULL
);
CREATE TABLE reliability_runs (
    encoder_id     VARCHAR NOT NULL,
    index_version  INTEGER NOT NULL,
    k              INTEGER NOT NULL,
    mode           VARCHAR NOT NULL,           -- 'full' or 'incremental'
    base_version   INTEGER,                    -- the version an incremental update started from
    n_samples      BIGINT NOT NULL,
    n_requeried    BIGINT NOT NULL,            -- samples whose top-k was recomputed
    seconds        DOUBLE NOT NULL,
    path           VARCHAR NOT NULL,           -- neighbour lists (parquet), relative to the home
    created_at     TIMESTAMP NOT NULL,
    PRIMARY KEY (encoder_id, index_version, k)
);

-- The nearest-neighbour distance beyond which a query is answered 'unknown'.
CREATE TABLE novelty_thresholds (
    encoder_id     VARCHAR NOT NULL,
    index_version  INTEGER NOT NULL,
    percentile     DOUBLE NOT NULL,
    distance       DOUBLE NOT NULL,            -- 1 - cosine similarity
    n_sampled      BIGINT NOT NULL,
    created_at     TIMESTAMP NOT NULL
);

ALTER TABLE evaluations ADD COLUMN pruning VARCHAR DEFAULT 'none';
ALTER TABLE evaluation_labels ADD COLUMN pruning VARCHAR DEFAULT 'none';

-- Reliability diagram: accuracy per confidence bin (default strategy and k).
CREATE TABLE evaluation_calibration (
    evaluation_id    BIGINT NOT NULL,
    bin_low          DOUBLE NOT NULL,
    bin_high         DOUBLE NOT NULL,
    n_queries        INTEGER NOT NULL,
    mean_confidence  DOUBLE,
    accuracy         DOUBLE
);

-- How often queries were flagged unknown: of labels the memory holds, and of labels it lacks.
CREATE TABLE evaluation_novelty (
    evaluation_id   BIGINT NOT NULL,
    distance        DOUBLE NOT NULL,
    percentile      DOUBLE NOT NULL,
    n_known         INTEGER NOT NULL,
    flagged_known   INTEGER NOT NULL,
    n_unseen        INTEGER NOT NULL,
    flagged_unseen  INTEGER NOT NULL
);
