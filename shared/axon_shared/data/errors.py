"""The one error type of the data pipeline."""

from __future__ import annotations

from ..errors import AxonError


class DataSourceError(AxonError, RuntimeError):
    """A dataset's raw source could not be fetched or read (registry down, tool missing, bad archive)."""
