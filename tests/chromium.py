"""Headless Chromium for the HTML report tests (Debian's chromium; .ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    """The browser's path; fails in CI and skips elsewhere when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def browser_command(profile: Path) -> list[str]:
    """Headless Chromium with logging to stderr, a 5 s virtual time budget and its own profile folder."""
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    return [*browser, "--virtual-time-budget=5000", f"--user-data-dir={profile}"]


def rendered_dom(page: Path, profile: Path, *, width: int = 1400) -> tuple[str, str]:
    """The page's DOM after its scripts ran in a window ``width`` pixels wide, and Chromium's log; asserts that
    Chromium succeeded."""
    command = [*browser_command(profile), f"--window-size={width},1000", "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr
