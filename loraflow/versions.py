"""Installed library versions, as this Python sees them (the env check, a run's summary, the ipex-llm probe)."""

from __future__ import annotations

import importlib.metadata


def installed_version(package: str) -> str | None:
    """The installed distribution's version in this Python, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
