"""The error of a source that cannot be listed at all."""

from schemas.errors import UserError


class SourceError(UserError):
    """An input that cannot be listed at all (missing path, unknown format, missing column)."""
