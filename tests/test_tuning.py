"""Process tuning: a node raises its own open-file limit at start."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_a_low_soft_open_file_limit_is_raised_toward_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    code = (
        "import resource\n"
        "from p2pfl.tuning import OPEN_FILES_WANTED, raise_open_file_limit\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 256\n"
        "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=low_limit, capture_output=True, text=True,
        timeout=60, check=True,
    )
    returned, now = map(int, result.stdout.split())
    expected = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert returned == now == expected
    assert now > 256
