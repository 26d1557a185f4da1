"""Errors of the data layer."""


class DataError(ValueError):
    """Missing, malformed or corrupt input data; the message names the file or folder and the fix."""
