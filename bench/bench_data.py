"""Where the benchmarks find their real public data (docs/BENCHMARK_DATA.md lists the files and sources).

``DENSECURATE_BENCH_DATA`` names the folder; by default it is ``bench/data`` in the repository
(ignored by git). A benchmark whose data is missing falls back to what it can make itself and says so.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "data"


def bench_data(*parts: str) -> Path:
    """``DENSECURATE_BENCH_DATA/parts...`` (default ``bench/data/parts...``)."""
    return Path(os.environ.get("DENSECURATE_BENCH_DATA") or DEFAULT).joinpath(*parts)


def photo_dirs() -> tuple[Path, Path]:
    """The benchmark data's real photos: Open Images (CC BY) and SA-1B."""
    return bench_data("images", "openimages_ccby_cc3m_test"), bench_data("images", "sa1b_fastsam")


def photos() -> list[Path]:
    """The benchmark data's photos; the bundled sample photos (written to a temporary folder) when missing."""
    found = sorted(p for folder in photo_dirs() if folder.is_dir() for p in folder.glob("*.jpg"))
    if found:
        return found
    from pipeline.sample_data import write_sample_folder

    print("benchmark images not found: using the bundled sample photos", file=sys.stderr)
    folder = write_sample_folder(Path(tempfile.mkdtemp()) / "photos", with_bad_files=False)
    return sorted(folder.glob("*.*g"))
