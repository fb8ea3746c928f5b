"""Errors of the captioner that callers handle (importable without torch)."""

from schemas.errors import UserError


class ModelNotAvailableError(UserError):
    """The model is neither a local directory nor cached, and cannot be downloaded here."""


class UnsupportedModelError(UserError):
    """The model is no captioner densecurate runs: not image-text-to-text, or without a tokenizer with a chat
    template."""


class VllmEnvironmentError(UserError):
    """The vLLM environment's interpreter is missing, does not run, or cannot import what the caption actors
    need (``make setup-vllm`` builds it)."""
