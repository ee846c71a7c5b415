"""The contract's errors: export/build failures and audio that cannot be read.

Each stage turns them into its own answer: the export commands into a one-line error and a
non-zero exit, training into a DataError naming the clip, the service into an HTTP status
(service.errors maps the AudioError subclasses).
"""


class ExportError(RuntimeError):
    """An input is missing or unusable, or an output cannot be written. The message says which."""


class VerificationFailed(ExportError):
    """An artifact is past its parity thresholds (the report says which and by how much)."""


class AudioError(ValueError):
    """Audio that cannot become a model input. The message says why, in words for a user."""


class UnsupportedAudio(AudioError):
    """Not a format, encoding, channel count or rate the reader decodes."""


class AudioTooLong(AudioError):
    """Longer than the caller's limit (from the header before decoding, or while decoding)."""


class AudioTooLarge(AudioError):
    """More samples to decode (frames x channels) than the caller's budget allows."""


class InvalidAudio(AudioError):
    """Decodes, but holds no samples or non-finite ones."""
