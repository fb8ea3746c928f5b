"""The errors a user can cause and fix, and the failures of the environment densecurate runs in.

The CLI prints a ``UserError`` as one sentence and exits with 2, an ``EnvironmentFailure`` as one
sentence and exits with 1. Every other exception is a bug of densecurate: the CLI shows its
traceback and exits with 1. With ``densecurate --debug`` (or ``DENSECURATE_DEBUG=1``) every error
shows its traceback.
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


class DamagedOutputError(UserError):
    """A stored output of an earlier stage does not read; the message names the file and what mends it."""


class OutputPathError(UserError):
    """An output folder or file cannot be made where the user asked (a read-only or virtual file system, no
    permission)."""


class EnvironmentFailure(Exception):
    """Not the user's mistake, nor a bug: the machine or cluster failed (a dead Ray head, a worker
    killed more often than it may restart, a full disk). The message says what failed and how to
    go on (usually: rerun the same command, finished shards are kept)."""
