"""Plain, typed pipeline steps with thin Prefect task wrappers."""
