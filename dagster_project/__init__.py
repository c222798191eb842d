"""The vismem Dagster code location: a thin layer that turns Dagster events into calls on
the `vismem_assets` core."""
from vismem_assets.settings import setup

# The code location's entry point (workspace.yaml loads dagster_project.definitions; the demo and
# the tests import this package first): the BLAS set-up runs here, before numpy or faiss load.
setup()
