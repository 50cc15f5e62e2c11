"""``--allow FILE`` is re-read on SIGHUP, without a restart (issue 22): a real daemon
process, a member added to the file gets in and has its update accepted; removed
again, it is cut and refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from runtimes import LOOPBACK, push_update, wait_until
from test_hostile_peer import signed

from gossip import NodeKey
from p2pfl.peer_exchange import PeerBook, exchange_peers, serve_peer_exchange
from p2pfl.runtime import model_arrays
from p2pfl.transport import Transport, TransportError

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
# Guards against a hang (the daemon imports torch and libp2p), not claims about speed.
GUARD_S = 120


def _status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


async def _reaches(member: Transport, node_addr: str, node_id: str) -> bool:
    """Whether ``member`` can connect and do a peer exchange (members only get that)."""
    try:
        await member.connect(node_addr, timeout=5)
        await exchange_peers(member, node_id, PeerBook(member.peer_id), timeout=5)
    except TransportError:
        return False
    return True


async def test_sighup_reloads_the_allow_file(digits: Any, tmp_path: Path) -> None:
    node_key, member_key = NodeKey.generate(), NodeKey.generate()
    node_key.save(tmp_path / "node.key")
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{NodeKey.generate().peer_id}  # someone else\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "p2pfl.cli", "node", "--key", "node.key", "--state-dir", "state",
         "--listen", LOOPBACK, "--status-addr", "127.0.0.1:0", "--allow", "allow.txt",
         "--min-neighbours", "100"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        with trio.fail_after(GUARD_S):
            announced: dict[str, str] = {}
            while "status" not in announced:
                line = await trio.to_thread.run_sync(process.stdout.readline)  # type: ignore[union-attr]
                assert line, "the daemon exited before announcing its status address"
                word, _, rest = line.strip().partition(" ")
                announced.setdefault(word, rest)
            node_addr, status_url = announced["listen"], announced["status"]
            model = model_arrays(digits.make_model())
            async with Transport.open(member_key, [LOOPBACK]) as member:
                serve_peer_exchange(member, PeerBook(member.peer_id))
                assert not await _reaches(member, node_addr, node_key.peer_id)

                allow.write_text(f"{member_key.peer_id}\n")
                process.send_signal(signal.SIGHUP)
                while not await _reaches(member, node_addr, node_key.peer_id):
                    await trio.sleep(0.1)  # until the daemon has taken the signal
                update = signed(member_key, model, 1)
                receipt = await push_update(member, node_key.peer_id, update, 5)
                assert receipt is not None and receipt.accepted, receipt

                allow.write_text("# nobody\n")
                process.send_signal(signal.SIGHUP)
                await wait_until(lambda: node_key.peer_id not in member.connected_peers(), GUARD_S)
                assert not await _reaches(member, node_addr, node_key.peer_id)
            status = await trio.to_thread.run_sync(_status, status_url)
            assert status["updates_accepted"] == 1
            assert process.poll() is None, "SIGHUP must not stop the node"
    finally:
        process.terminate()
        process.wait(timeout=60)
