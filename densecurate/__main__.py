"""``python -m densecurate``: the same as the ``densecurate`` console script."""

import sys

from densecurate.cli import main

sys.exit(main())
