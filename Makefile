# The README's two commands are `make demo` and `make test`; both set everything up first.
.PHONY: setup demo demo-headless test

setup:
	@bash scripts/setup.sh

# Dagster UI with a demo feed of image sets arriving in the inbox.
demo: setup
	bash scripts/demo.sh

# The same life cycle in-process, for machines without a browser; prints a summary.
demo-headless: setup
	VISMEM_HOME=$${VISMEM_HOME:-$$PWD/vismem_home} .venv/bin/python -m dagster_project.demo headless

test: setup
	.venv/bin/python -m pytest
