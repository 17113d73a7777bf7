"""Prefect flows that wire the pipeline's tasks, and the ``atp`` command line."""
