"""Prefect flows: the DAGs a user runs, schedules and retries."""

from loraflow import process

# A flow's process (Prefect's engine on a worker, `loraflow serve`, the CLI) loads, quantizes and merges models but
# never runs DeepSpeed: the trainer, its own process, does. loraflow.process blocks its import (what it costs is said
# there) and filters the libraries' deprecation warnings.
process.setup()
