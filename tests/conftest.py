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


# -- every test file has one kind --------------------------------------------------------
# So that `pytest -m unit` (or property, integration, e2e, lab) runs one kind of test, each
# file says its kind once, as its module's `pytestmark`: the heaviest thing any of its
# tests does, lab (namespaces) > e2e (our commands as subprocesses) > integration (a real
# network in this process) > property (hypothesis) > unit. `slow` is not a kind.

KINDS = ("unit", "property", "integration", "e2e", "lab")
SERIAL_KINDS = {"e2e", "lab"}


def kinds_of(item: pytest.Item) -> set[str]:
    return {mark.name for mark in item.iter_markers() if mark.name in KINDS}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected file is checked
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = sorted({
        f"{item.path.name} ({', '.join(sorted(kinds_of(item))) or 'none'})"
        for item in items
        if len(kinds_of(item)) != 1
    })  # fmt: skip
    if wrong:
        raise pytest.UsageError(
            f"each test file needs exactly one kind of {', '.join(KINDS)}, as a module-level "
            f"`pytestmark = pytest.mark.<kind>` (see tests/conftest.py); wrong: "
            + ", ".join(wrong)
        )
    # Under `pytest -n 2 --dist loadgroup` (make test): the lab's tests share the root
    # namespace's links and nft tables, and each e2e test runs its own daemons, so each
    # kind runs on one worker, one test at a time, beside the in-process kinds.
    for item in items:
        for kind in kinds_of(item) & SERIAL_KINDS:
            item.add_marker(pytest.mark.xdist_group(kind))


# -- the network lab must run where it can ------------------------------------------------
# CI runs as root, where the lab tests (marked `lab`) can build namespaces: a lab test
# that skips there (nftables missing, say) would hide the very thing the suite is meant
# to check, so under CI such a skip is turned into a failure naming its reason.

pytest_plugins = ("pytester",)

_lab_reason: list[str | None] = []


def _lab_unavailable() -> str | None:
    if not _lab_reason:
        from p2pfl.lab.namespaces import lab_unavailable_reason

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
