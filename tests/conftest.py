"""Test-wide settings: deterministic property tests in CI, exploring ones elsewhere.

On a developer's machine hypothesis draws new examples every run and keeps
the failures it finds in its database. CI (``CI`` set in the environment)
runs the same derived examples every time, so a red build always means a
change broke something, never that a new random draw found an old bug.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
