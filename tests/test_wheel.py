"""A built wheel works: build it from the source tree, install it into a fresh virtual
environment, and run ``p2pfl`` from there as an operator would.

Installing torch and libp2p from scratch would take minutes and a network, so the
fresh environment sees the dependencies already installed beside this interpreter
through a ``.pth`` file. A path line in a ``.pth`` only extends ``sys.path``; the
``.pth`` files inside that directory (the editable install of this checkout among
them) are not run, so the project's own packages come from the wheel alone, which
the test checks: ``p2pfl.__file__`` and the other packages must lie inside the fresh
environment, and the status page must be served from the wheel's package data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
# Guards against a hang (torch and libp2p import slowly on a busy machine), not timings.
TIMEOUT_S = 300
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "runs", "out", "*.egg-info", "__pycache__",
    ".pytest_cache", ".hypothesis", ".ruff_cache",
)  # fmt: skip
PACKAGES = ("p2pfl", "gossip", "topologies", "fltasks")


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)  # a build writes into its tree
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", ".", "-w", str(wheels)],
        cwd=source, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = wheels.glob("p2pfl_gossip-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "installed_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip


def _lone_node(*extra: str) -> list[str]:
    return [
        "p2pfl", "node", "--key", "node.key", "--state-dir", "state",
        "--listen", "/ip4/127.0.0.1/tcp/0", "--status-addr", "127.0.0.1:0",
        "--min-neighbours", "0", *extra,
    ]  # fmt: skip


def test_the_wheel_installs_and_runs_a_node_in_a_fresh_venv(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    venv = _fresh_venv(tmp_path, wheel)
    work = tmp_path / "work"  # not the checkout: nothing may be imported from the cwd
    work.mkdir()

    where = _run(
        venv, "python", "-c",
        f"import json, {', '.join(PACKAGES)}; "
        f"print(json.dumps([m.__file__ for m in ({', '.join(PACKAGES)})]))",
        cwd=work,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    for path in json.loads(where.stdout):
        assert Path(path).is_relative_to(venv), f"{path} is not the wheel's copy"

    version = _run(venv, "p2pfl", "--version", cwd=work)
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"p2pfl \d+\.\d+\.\d+\S*", version.stdout.strip()), version.stdout
    assert wheel.name.startswith(f"p2pfl_gossip-{version.stdout.split()[1]}-")

    keygen = _run(venv, "p2pfl", "keygen", "node.key", cwd=work)
    assert keygen.returncode == 0, keygen.stderr
    assert keygen.stdout.startswith("12D3KooW")

    one_round = _run(venv, *_lone_node("--rounds", "1", "--linger", "0"), cwd=work)
    assert one_round.returncode == 0, one_round.stderr[-3000:]
    assert "stopped at round 1 " in one_round.stdout

    # A node that runs until stopped, asked by `p2pfl status --json` while it runs.
    log = (tmp_path / "node.log").open("w")  # a file: a full pipe would block the node
    node = subprocess.Popen(
        [str(venv / "bin" / "p2pfl"), *_lone_node()[1:]],
        cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        assert node.stdout is not None
        address = None
        for line in node.stdout:  # "status http://127.0.0.1:PORT/status" once it listens
            if line.startswith("status http://"):
                address = line.split("//", 1)[1].split("/", 1)[0]
                break
        assert address is not None, "the node never printed its status address"
        status = _run(venv, "p2pfl", "status", "--status-addr", address, "--json", cwd=work)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["peer_id"] == keygen.stdout.strip()
        with urllib.request.urlopen(f"http://{address}/", timeout=30) as page:
            assert page.status == 200  # the page, from the wheel's package data
            assert b"<html" in page.read().lower()
        node.send_signal(signal.SIGTERM)
        out, _ = node.communicate(timeout=TIMEOUT_S)
        assert node.returncode == 0, (tmp_path / "node.log").read_text()[-3000:]
        assert "stopped at round" in out
    finally:
        if node.poll() is None:
            node.kill()
            node.communicate()
        log.close()
