"""The one exception type for bad input, so the pipeline can tell a bad file from a bug."""
from __future__ import annotations


class DataError(Exception):
    """A sample cannot be built because of its input files.

    Carries the offending file and the field inside it, so the message says where to look; the
    pipeline either re-raises it or skips the sample and counts it (config `on_error`).
    """

    def __init__(self, path: str, field: str, message: str):
        super().__init__(f"{path} [{field}]: {message}")
        self.path, self.field, self.message = path, field, message

    def __reduce__(self):  # travels from Grain worker processes to the trainer intact
        return type(self), (self.path, self.field, self.message)
