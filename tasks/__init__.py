"""Prefect tasks, one per stage: cache key, result persistence, logging, then one call into loraflow."""
