"""Test-wide settings: deterministic property tests in CI, exploring ones elsewhere.

On a developer's machine hypothesis draws new examples every run and keeps
the failures it finds in its database. CI (``CI`` set in the environment)
runs the same derived examples every time, so a red build always means a
change broke something, never that a new random draw found an old bug.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from fltasks import Task

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# -- fixtures shared by several files -----------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Task:
    """The built-in digits task (seed 0), loaded once per module."""
    from fltasks import load_task  # here, not at the top: unit runs need no torch

    return load_task("digits")


# -- the network lab must run where it can ------------------------------------------------
# CI runs as root, where the lab tests (marked `lab`) can build namespaces: a lab test
# that skips there (nftables missing, say) would hide the very thing the suite is meant
# to check, so under CI such a skip is turned into a failure naming its reason.

pytest_plugins = ("pytester",)

_lab_reason: list[str | None] = []


def _lab_unavailable() -> str | None:
    if not _lab_reason:
        from p2pfl.lab.netlab import lab_unavailable_reason

        _lab_reason.append(lab_unavailable_reason())
    return _lab_reason[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not (report.skipped and item.get_closest_marker("lab") and os.environ.get("CI")):
        return
    if hasattr(report, "wasxfail") or _lab_unavailable() is not None:
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (
        f"CI can run the network lab here (root, namespaces can be created), but "
        f"{item.nodeid} skipped: {reason}. Install what it names; CI must run it."
    )
