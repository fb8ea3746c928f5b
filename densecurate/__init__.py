"""The ``densecurate`` command line: argument parsers and command handlers (the top layer)."""
