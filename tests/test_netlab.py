"""The network lab: hosts in namespaces, cuts that heal, NAT, loss, and daemons across them.

Runs as root on a machine that can create network namespaces (CI does); skips with
one line otherwise. NAT and loss need nftables and skip with the install command
when it is missing. Every test checks that its lab left no namespace behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gossip.keys import NodeKey
from p2pfl.labwatch import books_complete
from p2pfl.netlab import (
    PREFIX,
    Lab,
    LabError,
    LabNetwork,
    lab_namespaces,
    lab_unavailable_reason,
    nft_missing_reason,
)
from p2pfl.transport import Transport, TransportError

UNAVAILABLE = lab_unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
NO_NFT = nft_missing_reason()
needs_nft = pytest.mark.skipif(NO_NFT is not None, reason=NO_NFT or "")

PORT = 7000
# Failure deadlines only: a correct run finishes long before them.
DAEMON_DEADLINE_S = 120.0


@pytest.fixture(autouse=True)
def no_namespaces_left() -> Iterator[None]:
    yield
    ours = [name for name in lab_namespaces() if name.startswith(f"{PREFIX}-{os.getpid()}-")]
    assert ours == [], f"the lab left namespaces behind: {ours}"


def listen(index: int, lab: Lab) -> socket.socket:
    def open_listener() -> socket.socket:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", PORT))
        server.listen()
        return server

    return lab.run(index, open_listener)


def dial(lab: Lab, source: int, address: str) -> str:
    """'ok' or the error's name: a TCP connect from host ``source`` to ``address``."""

    def attempt() -> str:
        with socket.socket() as client:
            client.settimeout(1.0)
            try:
                client.connect((address, PORT))
            except OSError as error:
                return type(error).__name__ if error.errno is None else os.strerror(error.errno)
            return "ok"

    return lab.run(source, attempt)


def redial(lab: Lab, source: int, address: str, attempts: int = 10) -> str:
    """:func:`dial` until it connects, at most ``attempts`` times; the last outcome."""
    for _ in range(attempts):
        outcome = dial(lab, source, address)
        if outcome == "ok":
            break
    return outcome


def test_hosts_reach_each_other_a_cut_drops_silently_and_heals() -> None:
    with Lab(3) as lab:
        listeners = [listen(i, lab) for i in range(3)]
        addresses = [host.address for host in lab.hosts]
        assert len(set(addresses)) == 3
        assert [dial(lab, 0, a) for a in addresses] == ["ok", "ok", "ok"]
        lab.partition([[0, 1], [2]])
        assert [dial(lab, 0, a) for a in addresses] == ["ok", "ok", "TimeoutError"]
        assert dial(lab, 2, addresses[1]) == "TimeoutError"
        lab.heal()
        # The kernel's own recovery after a heal: a neighbour entry that failed during
        # the cut is retried on its own schedule, so a dial may need a few attempts.
        assert [redial(lab, 2, a) for a in addresses] == ["ok", "ok", "ok"]
        for listener in listeners:
            listener.close()


def test_leftovers_of_a_dead_lab_are_removed_and_live_ones_kept() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = f"{PREFIX}-{int(gone.stdout)}-h0"
    alive = f"{PREFIX}-{os.getppid()}-h0"  # our parent is running: its lab is in use
    subprocess.run(["ip", "netns", "add", dead], check=True)
    made_alive = subprocess.run(["ip", "netns", "add", alive]).returncode == 0
    try:
        with Lab(1):
            names = lab_namespaces()
            assert dead not in names
            assert not made_alive or alive in names
    finally:
        for name in (dead, alive if made_alive else None):
            if name:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_a_lab_is_torn_down_after_a_crash_inside_it() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(2) as lab:
        assert len(lab.namespaces()) == 3
        raise RuntimeError("boom")


def test_a_dial_without_a_route_fails_with_the_kernels_answer() -> None:
    nobody = NodeKey.generate().peer_id

    async def dial_outside(listen_addr: str) -> str:
        async with Transport.open(NodeKey.generate(), [listen_addr]) as transport:
            with pytest.raises(TransportError) as caught:
                # 10.78.0.0/16 has no route in the lab: the kernel answers at once,
                # where libp2p alone would retry it with backoff.
                await transport.connect(f"/ip4/10.78.0.1/tcp/4001/p2p/{nobody}", 5.0)
            return str(caught.value)

    with Lab(1) as lab:
        message = lab.run(0, lambda: trio.run(dial_outside, lab.hosts[0].listen))
    assert message.endswith("Network is unreachable")


@needs_nft
def test_nat_hides_private_hosts_and_shows_the_routers_address() -> None:
    with Lab(3, nats=[[1], [2]]) as lab:
        public = listen(0, lab)
        listeners = [listen(1, lab), listen(2, lab)]
        assert dial(lab, 1, lab.hosts[0].address) == "ok"
        _, (seen, _) = public.accept()
        assert seen == "10.77.0.200"  # NAT 0's public side, not 10.77.1.11
        assert dial(lab, 0, lab.hosts[1].address) == "Network is unreachable"
        assert dial(lab, 1, lab.hosts[2].address) != "ok"
        for listener in [public, *listeners]:
            listener.close()


@needs_nft
def test_loss_drops_inbound_packets() -> None:
    with Lab(2, loss_percent=99.99) as lab:
        listener = listen(1, lab)
        assert dial(lab, 0, lab.hosts[1].address) == "TimeoutError"
        listener.close()


def established(lab: Lab, index: int) -> set[tuple[str, str]]:
    """(local, peer) of host ``index``'s ESTABLISHED TCP connections to other hosts."""
    lines = subprocess.run(
        [*lab.exec_prefix(index), "ss", "-tnH", "state", "established"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    pairs = {(fields[-2], fields[-1]) for fields in (line.split() for line in lines) if fields}
    return {pair for pair in pairs if not pair[1].startswith("127.")}


def wait_until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DAEMON_DEADLINE_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {DAEMON_DEADLINE_S:.0f} s: {what}")


def test_daemons_train_through_a_cut_and_learn_across_it_after_the_heal(tmp_path: Path) -> None:
    options = ("--send-timeout", "1")
    with Lab(3) as lab, LabNetwork(
        lab, str(tmp_path), rounds=None, degree=2, local_epochs=1, extra_args=options
    ) as net:
        net.start_all()
        ids = [node.peer_id for node in net.started()]

        def everyone_heard_everyone() -> bool:
            statuses = net.statuses()
            return all(s is not None and len(s["last_seq"]) == 2 for s in statuses)

        wait_until(everyone_heard_everyone, "every node accepted updates from both others")
        assert all(s and s["addrs"][0].startswith(f"/ip4/{lab.hosts[i].address}/")
                   for i, s in enumerate(net.statuses()))
        before_cut = established(lab, 2)
        assert before_cut, "host 2 has connections to the others"
        lab.partition([[0, 1], [2]])
        at_cut = net.statuses()
        wait_until(
            lambda: all(s and s["round"] >= c["round"] + 3
                        for s, c in zip(net.statuses(), at_cut, strict=True)),
            "both sides keep training: 3 rounds each during the cut",
        )
        # Pushes run in the background, so a push across the cut fails after its own
        # deadline, not within the round that started it: wait for every node's.
        wait_until(
            lambda: all(s and sum(s["send_failures"].values()) > sum(c["send_failures"].values())
                        for s, c in zip(net.statuses(), at_cut, strict=True)),
            "every node counts failed pushes across the cut",
        )
        at_heal = net.statuses()
        lab.heal()

        def crossed() -> bool:
            now = net.statuses()
            lone, left = now[2], now[0]
            return bool(
                lone and left
                and any(lone["last_seq"].get(i, -1) > at_heal[2]["last_seq"].get(i, -1)
                        for i in ids[:2])
                and left["last_seq"].get(ids[2], -1) > at_heal[0]["last_seq"].get(ids[2], -1)
            )

        wait_until(crossed, "updates cross the old cut both ways")
        # Whatever was forgotten in the cut is known again, at the host's own address.
        wait_until(lambda: books_complete(net), "every saved peer book holds every other host")
        # The connections that went dead in the cut were closed and redialled, not
        # pushed into: none of them is still ESTABLISHED (in retransmission backoff).
        assert not (before_cut & established(lab, 2))


def test_a_rate_limit_is_set_on_both_ends_of_every_link_and_lifted() -> None:
    with Lab(2, nats=[[1]] if NO_NFT is None else []) as lab:
        ends = [(host.namespace, "eth0") for host in lab.hosts] + [(lab.core, "h0")]
        if NO_NFT is None:
            ends.append((f"{lab.tag}-nat0", "h1"))

        def qdiscs() -> list[str]:
            return [subprocess.run(["tc", "-n", namespace, "qdisc", "show", "dev", device],
                                   capture_output=True, text=True, check=True).stdout
                    for namespace, device in ends]

        assert not any("tbf" in shown for shown in qdiscs())
        lab.limit_rate(5.0)
        assert all("tbf" in shown and "rate 5Mbit" in shown for shown in qdiscs())
        lab.limit_rate(None)
        assert not any("tbf" in shown for shown in qdiscs())


def test_nat_and_loss_without_nftables_name_the_package(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nft on it
    for options in ({"nats": [[1]]}, {"loss_percent": 1.0}):
        with pytest.raises(LabError, match="apt-get install -y nftables"):
            Lab(2, **options)


@pytest.mark.slow
def test_the_partition_scenario_script_reports_the_heal(tmp_path: Path) -> None:
    script = Path(__file__).parent.parent / "scripts" / "netlab.py"
    subprocess.run(
        [sys.executable, str(script), "partition", "--hosts", "4", "--cut-rounds", "3",
         "--settle", "5", "--out", str(tmp_path)],
        check=True, capture_output=True, timeout=600,
    )
    [result] = json.loads((tmp_path / "summary.json").read_text())
    assert result["push_failures_during_cut"] > 0
    assert result["consensus_distance_at_heal"] > result["consensus_distance_connected"]
    assert result["rounds_to_connected_accuracy"] is not None
    assert result["rounds_to_connected_consensus"] is not None
    assert result["seconds_until_books_complete"] is not None
    assert result["accuracy_min_end"] >= 0.9
    record = json.loads((tmp_path / "partition.json").read_text())
    assert [event["label"] for event in record["runs"][0]["events"]] == ["all up", "cut", "heal"]
    assert (tmp_path / "partition.png").read_bytes().startswith(b"\x89PNG")
