"""The vismem Dagster code location: a thin layer that turns Dagster events into calls on
the `vismem_assets` core."""
