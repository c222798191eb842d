# The two commands of the README: `make demo` and `make test`. Both set everything up first.
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/vismem demo

test: setup
	.venv/bin/python -m pytest
