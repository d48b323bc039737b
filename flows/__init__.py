"""Prefect flows: the DAGs a user runs, schedules and retries."""
