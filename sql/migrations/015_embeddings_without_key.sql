-- vismem ledger, version 15: `embeddings` without its primary key. DuckDB keeps a key as an ART
-- index of its strings (encoder id and sample id, ~160 bytes a row): at 10^6 embedded samples a
-- forget's 10^4 deleted rows cost ~0.3 s of its commit and checkpoint in that index alone (and
-- every recorded part pays to insert into it). One (encoder, sample) row each is kept by the one
-- writer of these rows (embedding.Recorder: what is already recorded is dropped first, in the same
-- transaction, under the ledger lock) and checked by `vismem audit verify`. The NOT NULLs stay.
CREATE TABLE embeddings_new (
    encoder_id   VARCHAR NOT NULL,
    sample_id    VARCHAR NOT NULL,
    path         VARCHAR NOT NULL,            -- relative to the memory home
    embedded_at  TIMESTAMP NOT NULL
);
INSERT INTO embeddings_new SELECT encoder_id, sample_id, path, embedded_at FROM embeddings ORDER BY encoder_id, path;
DROP TABLE embeddings;
ALTER TABLE embeddings_new RENAME TO embeddings;
