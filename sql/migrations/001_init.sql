-- vismem ledger, version 1: the truth from which embeddings and indexes are derived.
-- Names here are a user-facing interface (audit SQL is written against them): rename only
-- through a new migration that keeps a compatible view.

CREATE SEQUENCE IF NOT EXISTS vector_id_seq START 1;   -- FAISS ids: unique, never reused
CREATE SEQUENCE IF NOT EXISTS ingest_id_seq START 1;
CREATE SEQUENCE IF NOT EXISTS evaluation_id_seq START 1;

-- One row per image set (a folder or manifest that arrived under a name).
CREATE TABLE image_sets (
    name            VARCHAR PRIMARY KEY,
    source          VARCHAR,          -- where it was read from, as given
    first_added_at  TIMESTAMP NOT NULL,
    last_added_at   TIMESTAMP NOT NULL
);

-- One row per distinct image content (sample_id = sha256 of the bytes).
CREATE TABLE samples (
    sample_id      VARCHAR PRIMARY KEY,        -- sha256 hex of the image bytes
    vector_id      BIGINT UNIQUE,              -- id inside FAISS; NULL only for quarantined files
    label          VARCHAR,                    -- current label (history in label_history)
    image_set      VARCHAR NOT NULL,           -- the set it first arrived with
    status         VARCHAR NOT NULL CHECK (status IN ('active', 'forgotten', 'quarantined')),
    added_at       TIMESTAMP NOT NULL,
    image_path     VARCHAR,                    -- content-addressed store path, relative to the memory home
    original_name  VARCHAR,                    -- file path inside its set, as it arrived
    format         VARCHAR,
    width          INTEGER,
    height         INTEGER,
    n_bytes        BIGINT
);

-- Every arrival of a sample with a set, duplicates included.
CREATE TABLE sample_sources (
    sample_id      VARCHAR NOT NULL,
    image_set      VARCHAR NOT NULL,
    original_name  VARCHAR,
    label          VARCHAR,
    ingest_id      BIGINT NOT NULL,
    arrived_at     TIMESTAMP NOT NULL
);

CREATE TABLE label_history (
    sample_id   VARCHAR NOT NULL,
    label       VARCHAR,
    changed_at  TIMESTAMP NOT NULL,
    reason      VARCHAR NOT NULL             -- 'ingest', 'relabel', ...
);

-- Files that could not be taken, with why. sample_id is NULL when the bytes could not be read.
CREATE TABLE quarantine (
    ingest_id       BIGINT NOT NULL,
    image_set       VARCHAR NOT NULL,
    original_name   VARCHAR NOT NULL,
    sample_id       VARCHAR,
    reason          VARCHAR NOT NULL,
    stored_path     VARCHAR,                 -- copy of the bad bytes under quarantine/, if readable
    quarantined_at  TIMESTAMP NOT NULL
);

-- One row per ingest run: what a person would want to know afterwards.
CREATE TABLE ingests (
    ingest_id       BIGINT PRIMARY KEY,
    image_set       VARCHAR NOT NULL,
    source          VARCHAR,
    started_at      TIMESTAMP NOT NULL,
    finished_at     TIMESTAMP,
    n_files         INTEGER,
    n_added         INTEGER,
    n_duplicates    INTEGER,
    n_quarantined   INTEGER
);

CREATE TABLE encoders (
    encoder_id      VARCHAR PRIMARY KEY,     -- name@weights-hash:preprocessing
    slug            VARCHAR NOT NULL UNIQUE, -- folder name under embeddings/ and indexes/
    name            VARCHAR NOT NULL,
    dim             INTEGER NOT NULL,
    weights_sha256  VARCHAR NOT NULL,
    preprocessing   VARCHAR NOT NULL,
    spec            VARCHAR NOT NULL,        -- how to load it again: vismem --encoder SPEC
    first_used_at   TIMESTAMP NOT NULL,
    last_used_at    TIMESTAMP NOT NULL
);

-- Which samples an encoder has embedded, and in which parquet file.
CREATE TABLE embeddings (
    encoder_id   VARCHAR NOT NULL,
    sample_id    VARCHAR NOT NULL,
    path         VARCHAR NOT NULL,            -- relative to the memory home
    embedded_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (encoder_id, sample_id)
);

-- Immutable index versions; exactly one 'live' per encoder.
CREATE TABLE index_versions (
    encoder_id      VARCHAR NOT NULL,
    version         INTEGER NOT NULL,
    path            VARCHAR NOT NULL,          -- relative to the memory home
    sha256          VARCHAR NOT NULL,
    parent_version  INTEGER,
    operation       VARCHAR NOT NULL,          -- 'add', 'rebuild', ...
    n_vectors       BIGINT NOT NULL,
    created_at      TIMESTAMP NOT NULL,
    status          VARCHAR NOT NULL CHECK (status IN ('live', 'retained', 'purged')),
    index_type      VARCHAR NOT NULL,          -- FAISS factory string
    n_added         BIGINT NOT NULL DEFAULT 0,
    n_removed       BIGINT NOT NULL DEFAULT 0,
    note            VARCHAR,
    PRIMARY KEY (encoder_id, version)
);

-- The delta of each version against its parent (a rebuild has none: it is whole).
CREATE TABLE index_deltas (
    encoder_id  VARCHAR NOT NULL,
    version     INTEGER NOT NULL,
    change      VARCHAR NOT NULL CHECK (change IN ('add', 'remove')),
    vector_id   BIGINT NOT NULL
);

-- Per-sample vote weights (pruning), grouped in named weight sets per index version.
CREATE TABLE weight_sets (
    encoder_id     VARCHAR NOT NULL,
    index_version  INTEGER NOT NULL,
    name           VARCHAR NOT NULL,           -- e.g. 'soft', 'hard'
    params         VARCHAR,                    -- JSON
    active         BOOLEAN NOT NULL DEFAULT FALSE,
    created_at     TIMESTAMP NOT NULL,
    PRIMARY KEY (encoder_id, index_version, name)
);
CREATE TABLE sample_weights (
    encoder_id     VARCHAR NOT NULL,
    index_version  INTEGER NOT NULL,
    name           VARCHAR NOT NULL,
    vector_id      BIGINT NOT NULL,
    weight         DOUBLE NOT NULL
);

-- Accuracy per strategy and k, per index version: the memory's history.
CREATE TABLE evaluations (
    evaluation_id  BIGINT NOT NULL,
    encoder_id     VARCHAR NOT NULL,
    index_version  INTEGER NOT NULL,
    query_set      VARCHAR NOT NULL,           -- a path, or 'leave-one-out'
    strategy       VARCHAR NOT NULL,
    k              INTEGER NOT NULL,
    accuracy       DOUBLE NOT NULL,
    n_queries      INTEGER NOT NULL,
    created_at     TIMESTAMP NOT NULL
);

-- Accuracy per true label of the same evaluation, at one strategy and k (the defaults).
CREATE TABLE evaluation_labels (
    evaluation_id  BIGINT NOT NULL,
    label          VARCHAR NOT NULL,
    strategy       VARCHAR NOT NULL,
    k              INTEGER NOT NULL,
    n_queries      INTEGER NOT NULL,
    accuracy       DOUBLE NOT NULL
);
