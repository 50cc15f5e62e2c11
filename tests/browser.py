"""Headless Chromium for the web page tests: render a page after its scripts ran.

Debian's ``chromium`` is what CI installs (.ci/run). Without it a test skips with one
line, except under CI (``CI`` set), where it fails: there the page must be checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Flags for a machine with no network: without the background-networking ones Chromium
# dials Google's hosts at start, and a closed network refuses those connections.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)
# Virtual time runs the page's timers (its polls) without waiting them out in real time.
VIRTUAL_TIME_MS = 4000
# A guard for a hung browser only: on a busy 2-core machine a start takes seconds.
BROWSER_TIMEOUT_S = 120


def chromium() -> str:
    """The browser's path; skips (fails under CI) when it is not installed."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    message = "chromium is not installed (apt-get install chromium); .ci/run installs it"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the web page tests, but {message}")
    pytest.skip(message)


def _run(url: str, *args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="p2pfl-chromium-") as profile:
        result = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}",
             f"--virtual-time-budget={VIRTUAL_TIME_MS}", *args, url],
            capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False,
        )
    assert result.returncode == 0, f"chromium failed: {result.stderr[-2000:]}"
    return result.stdout


def rendered_dom(url: str) -> str:
    """The page's DOM once its scripts have run (``--dump-dom``)."""
    return _run(url, "--dump-dom")


def screenshot(url: str, path: Path, size: tuple[int, int] = (1400, 1500)) -> Path:
    _run(url, f"--window-size={size[0]},{size[1]}", f"--screenshot={path}")
    assert path.exists(), "chromium wrote no screenshot"
    return path
