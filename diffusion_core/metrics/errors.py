"""Errors of the metrics layer."""


class MetricsError(ValueError):
    """A metric cannot be computed from these inputs (wrong shapes, model kind, missing files); names the fix."""
