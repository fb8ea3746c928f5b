"""Errors of the captioner that callers handle (importable without torch)."""


class ModelNotAvailableError(RuntimeError):
    """The model is neither a local directory nor cached, and cannot be downloaded here."""
