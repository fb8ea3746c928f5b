"""Quiet by default: the advisory warnings and progress bars of the libraries densecurate drives.

``--verbose`` or ``--debug`` keeps them. The settings are environment variables, so the Ray workers a
command starts on this machine inherit them.
"""

from __future__ import annotations

import logging
import os

# Read by transformers, diffusers and huggingface_hub when they are imported; a value the user set wins.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# Ray's notice that a local cluster it starts uses token authentication (densecurate's own local Ray, on
# loopback), printed on every command.
RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_libraries() -> None:
    """Silence library warnings and weight-loading bars for this process and the workers it starts."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    logging.getLogger(RAY_TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
