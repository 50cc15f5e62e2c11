"""A plain ``pip install .`` (no ``lab`` extra) runs a node: the daemon and ``p2pfl
status`` never import rich or matplotlib, which come only with the lab extra.

The node runs as a real subprocess with both packages made unimportable (an entry of
None in ``sys.modules`` makes ``import`` raise ImportError), as on a machine that never
installed them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
# A guard against a hang (torch and libp2p import slowly on a busy machine).
TIMEOUT_S = 300
WITHOUT_EXTRAS = (
    "import sys\n"
    "for name in ('rich', 'matplotlib'):\n"
    "    sys.modules[name] = None\n"
    "from p2pfl.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _p2pfl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_a_node_runs_and_reports_without_the_lab_extra(tmp_path: Path) -> None:
    keygen = _p2pfl("keygen", "node.key", cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    node = _p2pfl(
        "node",
        "--key", "node.key",
        "--state-dir", "state",
        "--listen", "/ip4/127.0.0.1/tcp/0",
        "--status-addr", "127.0.0.1:0",
        "--min-neighbours", "0",
        "--rounds", "1",
        "--linger", "0",
        cwd=tmp_path,
    )  # fmt: skip
    assert node.returncode == 0, node.stderr[-2000:]
    assert "Traceback" not in node.stderr
    assert (tmp_path / "state").is_dir()
