"""A daemon under a low open-file limit keeps running rounds while 300 idle clients
hold connections to its status server (issue 10's local crash: EMFILE at the next
checkpoint made the node exit)."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gossip.keys import NodeKey
from p2pfl.checkpoint import FILE_NAME, decode_state

pytestmark = pytest.mark.e2e

ROUNDS = 25
IDLE_CLIENTS = 300


def test_300_idle_status_clients_under_a_256_fd_limit_do_not_stop_rounds(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    NodeKey.generate().save(key)

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    log = (tmp_path / "node.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "p2pfl.cli", "node", "--key", str(key),
         "--state-dir", str(tmp_path / "state"), "--min-neighbours", "0",
         "--rounds", str(ROUNDS), "--round-interval", "0.2", "--linger", "0"],
        stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=low_fd_limit,
    )
    idle: list[socket.socket] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("status "):
                host, port = line.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
                break
        for _ in range(IDLE_CLIENTS):
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        process.stdout.read()  # until the node exits
        assert process.wait(120) == 0
    finally:
        for client in idle:
            client.close()
        if process.poll() is None:
            process.kill()
        log.close()
    saved = decode_state((tmp_path / "state" / FILE_NAME).read_bytes())
    assert saved.round == ROUNDS
    assert "Traceback" not in (tmp_path / "node.log").read_text()
