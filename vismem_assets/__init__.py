"""vismem: a lifelong visual memory (see /DESIGN.md), the core library and the `vismem` CLI.

What belongs here: everything a user of the memory needs without Dagster. `memory.Memory` is a
thin facade that wires the services (ingest, embedding as encode + record, indexing, recall and
classify, evaluating, forgetting, pruning, edits, audit), each a module with one job and typed
dependencies. Below them: `ledger/` (all SQL, behind a repository), `index_kinds/` (one module per
FAISS index kind), `encoders/` (frozen image encoders), and the stores of files under the home.
Nothing here imports Dagster.

Importing the package has no side effects: the BLAS set-up (blas.py) and the settings
(settings.py) are the entry points' first step, `settings.setup()`, before numpy or faiss load.
"""
