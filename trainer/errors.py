"""Failures of training data or of training itself that stop a run and that the user can act on.

Each is a ``UserError``: the CLI prints its one-sentence message (which says what to do) and exits with 2.
"""

from __future__ import annotations

from schemas.errors import MissingInputError, UserError


def _worker_message(message: str) -> str:
    """The original message of an error a DataLoader worker process raised (torch re-raises it in the main
    process with the worker's traceback as the message; its last line is ``module.Class: message``)."""
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


class CorruptFeatureError(UserError):
    """A feature file of the training data does not parse or holds NaN or infinite values."""

    def __init__(self, message: str) -> None:
        super().__init__(_worker_message(message))


class TrainingDivergedError(UserError):
    """The loss, the gradients or the weights became NaN or infinite (past ``nan_tolerance`` skipped steps)."""


class UnusableCheckpointError(MissingInputError):
    """The run has checkpoints but none of them loads completely."""


class IncompatibleModelError(UserError):
    """A pretrained model whose type or sizes do not fit what it is converted to (the message names the field)."""


class FeatureMismatchError(UserError):
    """Feature shards made at another resolution, or with another VAE, text encoder or T5 max length, than the
    training config (the message names both values)."""


class UnreadableWeightsError(UserError):
    """A model's weights file is missing, damaged or cut short (the message names the file)."""
