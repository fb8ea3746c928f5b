"""Where the benchmarks find their real public data (docs/BENCHMARK_DATA.md lists the files and sources).

``DENSECURATE_BENCH_DATA`` names the folder; by default it is ``bench/data`` in the repository
(ignored by git). A benchmark whose data is missing falls back to what it can make itself and says so.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "data"


def bench_data(*parts: str) -> Path:
    """``DENSECURATE_BENCH_DATA/parts...`` (default ``bench/data/parts...``)."""
    return Path(os.environ.get("DENSECURATE_BENCH_DATA") or DEFAULT).joinpath(*parts)
