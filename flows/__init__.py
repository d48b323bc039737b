"""Prefect flows: the DAGs a user runs, schedules and retries."""

import sys

# A flow's process loads, quantizes and merges models but never runs DeepSpeed: the trainer, its own process, does
# (and imports it only then). transformers and accelerate import DeepSpeed whenever it is installed, which costs
# about half a second and prints an accelerator warning into the run's log.
sys.modules.setdefault("deepspeed", None)
