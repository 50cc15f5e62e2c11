"""The shipped service unit (contrib/systemd/) is one systemd accepts, and it starts the
node with flags and a config file that ``p2pfl node`` accepts.

``systemd-analyze verify`` checks the unit's syntax, every directive and that the
commands it names are executable; the unit names /opt/p2pfl/bin/p2pfl, where
docs/OPERATING.md installs it, so the test points that one path at an executable
of this machine first. Without systemd-analyze the test skips in one line, except
under CI (``CI`` set), where a skip would hide that the unit was never checked.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from p2pfl.cli import build_parser
from p2pfl.config import build_config, load_config_file

pytestmark = pytest.mark.unit

CONTRIB = Path(__file__).resolve().parents[1] / "contrib" / "systemd"
UNIT = CONTRIB / "p2pfl-node.service"
INSTALLED_AT = "/opt/p2pfl/bin/p2pfl"


def _exec_start() -> list[str]:
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    return shlex.split(lines[0].removeprefix("ExecStart="))


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing under CI: install systemd to check the unit")
        pytest.skip("systemd-analyze is not installed; the unit is not checked")
    stand_in = tmp_path / "p2pfl"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_AT, str(stand_in)))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert UNIT.name not in done.stderr, done.stderr  # no warning about the unit itself


def test_the_units_command_line_and_config_are_ones_p2pfl_node_accepts() -> None:
    command = _exec_start()
    assert command[0] == INSTALLED_AT
    args = build_parser().parse_args(command[1:])
    assert args.command == "node"
    assert Path(args.config).name == "node.toml"
    config = build_config(load_config_file(CONTRIB / "node.toml"), {})
    # The key and the checkpoints in the unit's StateDirectory, the only writable place.
    assert config.key.startswith("/var/lib/p2pfl/")
    assert config.state_dir.startswith("/var/lib/p2pfl/")
    assert "StateDirectory=p2pfl" in UNIT.read_text().splitlines()
    assert config.status_addr.startswith("127.0.0.1:")
