"""Errors of the captioner that callers handle (importable without torch)."""

from schemas.errors import UserError


class ModelNotAvailableError(UserError):
    """The model is neither a local directory nor cached, and cannot be downloaded here."""


class UnsupportedModelError(UserError):
    """The model loads but cannot caption (no tokenizer with a chat template)."""
