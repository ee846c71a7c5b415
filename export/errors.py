"""The one exception the export commands turn into a one-line error and a non-zero exit."""


class ExportError(RuntimeError):
    """An input is missing or unusable, or an output cannot be written. The message says which."""


class VerificationFailed(ExportError):
    """An artifact is past its parity thresholds (the report says which and by how much)."""
