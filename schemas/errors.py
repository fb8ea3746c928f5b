"""The errors a user can cause and fix. The CLI prints them as one sentence and exits with 2.

Every other exception is a bug of densecurate (or a failure of its environment): the CLI shows its
traceback and exits with 1.
"""


class UserError(Exception):
    """A mistake the user can fix: a path, an option, a setting, or stages run out of order."""


class MissingInputError(UserError):
    """An input the command needs does not exist (a path, or the output of an earlier stage)."""


class ConfigError(UserError):
    """A setting or a settings file is invalid; the message names the file and the field."""


class StaleInputError(UserError):
    """An input is older than what it depends on (e.g. density computed from earlier captions)."""


class OutputConflictError(UserError):
    """Writing the output would destroy data or collide with another run."""
