# The README's two commands are `make demo` and `make test`; both set everything up first.
.PHONY: setup demo demo-headless test test-fast bench

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

# The tests, then the benchmark suite at small sizes (about two minutes) so it cannot rot.
test: setup
	.venv/bin/python -m pytest
	mkdir -p test-artifacts
	.venv/bin/vismem bench --quick --json > test-artifacts/bench-quick.json

# The full benchmark run behind benchmarks/RESULTS.md (long: N = 100,000 and 1,000,000).
bench: setup
	.venv/bin/vismem bench
