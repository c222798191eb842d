"""The vismem Dagster code location: a thin layer that turns Dagster events into calls on
the `vismem_assets` core.

What belongs here: assets, jobs, sensors, schedules, checks and the `VisualMemory` resource, and
how their results are shown (metadata, plots). Nothing else: no SQL, no file formats, no
decisions about the memory; each asset calls the core's services and reports what they return.
"""
from vismem_assets.settings import setup

# The code location's entry point (workspace.yaml loads dagster_project.definitions; the demo and
# the tests import this package first): the BLAS set-up runs here, before numpy or faiss load.
setup()
