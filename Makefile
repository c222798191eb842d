# The README's two commands are `make demo` and `make test`; both set everything up first.
.PHONY: setup demo demo-headless test test-fast bench cluster-up cluster-down cluster-status cluster-demo

setup:
	@bash scripts/setup.sh

# Dagster UI with a demo feed of image sets arriving in the inbox.
demo: setup
	bash scripts/demo.sh

# The same life cycle in-process, for machines without a browser; prints a summary.
demo-headless: setup
	VISMEM_HOME=$${VISMEM_HOME:-$$PWD/vismem_home} .venv/bin/python -m dagster_project.demo headless

# The development loop (a few minutes): every test not marked slow. `make test` runs them all.
test-fast: setup
	.venv/bin/python -m pytest -m "not slow" -q

# The tests (the cluster tests, marked slow, start PostgreSQL, Redis, the daemon and Celery workers
# once, in a temporary folder, and stop them in a finalizer, also when a test fails), then the
# benchmark suite at small sizes (about two minutes) so it cannot rot, and the peer benchmark at
# N = 200,000 (about six minutes; its table is in the log, its JSON in test-artifacts/).
test: setup
	.venv/bin/python -m pytest
	mkdir -p test-artifacts
	.venv/bin/vismem bench --quick --json > test-artifacts/bench-quick.json
	.venv/bin/python -m benchmarks.peers --n 200000 --no-write --json-to test-artifacts/peers-200k.json

# The full benchmark run behind benchmarks/RESULTS.md (long: N = 100,000 and 1,000,000).
bench: setup
	.venv/bin/vismem bench

# The cluster profile on this machine (deploy/cluster/, scripts/cluster.sh): PostgreSQL, Redis,
# dagster-daemon, the webserver (http://127.0.0.1:3100) and Celery workers under ./.cluster.
# Then `source .cluster/cluster.env` for vismem and dagster commands on it.
cluster-up: setup
	bash scripts/cluster.sh up

cluster-down:
	bash scripts/cluster.sh down

cluster-status:
	bash scripts/cluster.sh status

# The demo feed (three sets, then two new classes) into the cluster's inbox; starts it if it is down.
cluster-demo: setup
	@bash scripts/cluster.sh running || VISMEM_QUERY_SET=$${VISMEM_QUERY_SET:-queries/fashion-test} bash scripts/cluster.sh up
	bash scripts/cluster.sh demo
