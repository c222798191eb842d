"""Benchmarks: each prints its figures next to a baseline measured in the same run."""
from vismem_assets.settings import setup

# The benchmarks' entry point (python -m benchmarks.X imports this package first): the BLAS
# set-up runs before numpy or faiss load, as in the CLI.
setup()
