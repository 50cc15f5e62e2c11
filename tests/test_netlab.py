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
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from runtimes import wait_for_daemons

from gossip.keys import NodeKey
from p2pfl.lab.namespaces import (
    PREFIX,
    LabError,
    lab_namespaces,
    lab_unavailable_reason,
    nft_missing_reason,
)
from p2pfl.lab.netlab import Lab, LabNetwork, serving_in
from p2pfl.lab.revocation import scenario_revoke
from p2pfl.relay import circuit_relay
from p2pfl.transport import Transport, TransportError

UNAVAILABLE = lab_unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]
NO_NFT = nft_missing_reason()
needs_nft = pytest.mark.skipif(NO_NFT is not None, reason=NO_NFT or "")

PORT = 7000
ROUTER_0 = "10.77.0.200"  # NAT 0's public address
# Failure deadlines only: a correct run finishes long before them, even on a machine
# kept busy by other work.
DAEMON_DEADLINE_S = 600.0


def _root_links_and_tables() -> tuple[set[str], str]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if ":" in line}
    tables = ""
    if NO_NFT is None:
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return names, tables


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """No namespace of ours afterwards, and the machine's own links and nft tables as
    they were (the lab's links and tables live inside its namespaces)."""
    before = _root_links_and_tables()
    yield
    ours = [name for name in lab_namespaces() if name.startswith(f"{PREFIX}-{os.getpid()}-")]
    assert ours == [], f"the lab left namespaces behind: {ours}"
    assert _root_links_and_tables() == before, "the lab changed the machine's links or tables"


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


@needs_nft
def test_daemons_behind_two_nats_learn_together_through_a_lossy_cut_and_heal(
    tmp_path: Path,
) -> None:
    """4 hosts with their own IPs: 0 and 1 public, 2 and 3 each behind its own NAT,
    1% loss on every host. The NATed members exchange updates (through a relay, or
    directly once DCUtR punched a hole), each node knows which of its addresses are
    public or NATed, a 2|2 cut keeps both sides training, and after the heal updates
    cross the old cut both ways."""
    # Rounds never wait for pushes, so a generous push deadline costs nothing; a short
    # one cut pushes off on a busy machine before the cut (1 s was too short).
    options = ("--send-timeout", "10")
    with Lab(4, nats=[[2], [3]], loss_percent=1.0) as lab, LabNetwork(
        lab, str(tmp_path), rounds=None, degree=3, local_epochs=1, extra_args=options
    ) as net:
        net.start_all()
        ids = [node.peer_id for node in net.started()]

        def everyone_heard_everyone() -> bool:
            statuses = net.statuses()
            return all(s is not None and len(s["last_seq"]) == 3 for s in statuses)

        wait_for_daemons(
            net, everyone_heard_everyone, DAEMON_DEADLINE_S,
            "every node accepted updates from all 3 others",
        )
        statuses = net.statuses()
        assert all(s and s["addrs"][0].startswith(f"/ip4/{lab.hosts[i].address}/")
                   for i, s in enumerate(statuses))
        kinds = [s["reachability"]["addrs"] if s else {} for s in statuses]
        assert [kinds[i].get(statuses[i]["addrs"][0]) for i in range(4)] == [
            "public", "public", "nated", "nated"
        ]
        for natted in (2, 3):
            relayed = [a for a, kind in kinds[natted].items() if kind == "relayed"]
            assert relayed, f"host {natted} holds a relay slot"
            assert {circuit_relay(a) for a in relayed} <= set(ids[:2])  # on public hosts
        # Each node says so once in its log, on stdout.
        for node in net.started():
            assert any(line.startswith("reachability ") for line in node.lines)

        lab.partition([[0, 2], [1, 3]])
        at_cut = net.statuses()
        wait_for_daemons(
            net,
            lambda: all(s and s["round"] >= c["round"] + 3
                        for s, c in zip(net.statuses(), at_cut, strict=True)),
            DAEMON_DEADLINE_S,
            "both sides keep training: 3 rounds each during the cut",
        )
        # Pushes run in the background, so a push across the cut fails after its own
        # deadline, not within the round that started it: wait for every node's.
        wait_for_daemons(
            net,
            lambda: all(s and sum(s["send_failures"].values()) > sum(c["send_failures"].values())
                        for s, c in zip(net.statuses(), at_cut, strict=True)),
            DAEMON_DEADLINE_S,
            "every node counts failed pushes across the cut",
        )
        at_heal = net.statuses()
        lab.heal()

        def heard_anew(at: int, sender: int) -> bool:
            now = net.statuses()[at]
            before = at_heal[at]
            assert before is not None
            return bool(now) and now["last_seq"].get(ids[sender], -1) > before["last_seq"].get(
                ids[sender], -1
            )

        wait_for_daemons(
            net,
            lambda: (any(heard_anew(a, b) for a in (0, 2) for b in (1, 3))
                     and any(heard_anew(b, a) for a in (0, 2) for b in (1, 3))),
            DAEMON_DEADLINE_S,
            "updates cross the old cut both ways",
        )


@needs_nft
@pytest.mark.xfail(
    strict=True,
    reason="py-libp2p 0.8.1's AutoNAT dials back with host.connect(), which returns at "
    "once over the connection the request came on: a NATed host is told it is reachable. "
    "p2pfl.reachability dials back on a fresh TCP connection instead",
)
def test_autonat_tells_a_natted_host_it_is_not_reachable() -> None:
    from libp2p.host.autonat.autonat import AutoNATService
    from libp2p.host.autonat.pb.autonat_pb2 import Message

    async def server(done: trio.Event, addrs: list[str]) -> None:
        async with Transport.open(NodeKey.generate(), [lab.hosts[0].listen]) as transport:
            AutoNATService(transport.host)  # type: ignore[arg-type]
            addrs.extend(transport.addrs)
            await done.wait()

    async def ask_autonat(server_addr: str) -> int:
        async with Transport.open(NodeKey.generate(), [lab.hosts[1].listen]) as transport:
            server_id = await transport.connect(server_addr, 5.0)
            client = AutoNATService(transport.host, serve=False)  # type: ignore[arg-type]
            # Our public address as the server sees it: the router's, at our port.
            public = Multiaddr(f"/ip4/{ROUTER_0}/tcp/4001")
            status, _ = await client.query_server(ID.from_base58(server_id), [public.to_bytes()])
            return status

    with Lab(2, nats=[[1]]) as lab, serving_in(lab, 0, server) as addrs:
        status = lab.run(1, lambda: trio.run(ask_autonat, addrs[0]))
        # The router drops unsolicited inbound: nothing can dial 10.77.0.200:4001.
        assert dial(lab, 0, ROUTER_0) != "ok"
    assert status != Message.OK


def test_under_ci_a_lab_test_that_skips_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """We are root with namespaces here (this module runs only then): under CI a
    skipped lab test must fail, naming why it skipped; elsewhere it may skip."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        "import pytest\n"
        "@pytest.mark.lab\n"
        "@pytest.mark.skip(reason='loss and NAT need nftables')\n"
        "def test_lab(): pass\n"
        "@pytest.mark.unit\n"
        "@pytest.mark.skip(reason='not a lab test')\n"
        "def test_other(): pass\n"
        "@pytest.mark.lab\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_known(): assert False\n"
    )
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(
        skipped=2, xfailed=1
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*CI can run the network lab here*: loss and NAT need nftables*"])


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
    # 12 rounds of 0.5 s: the cut outlasts a push's 5 s deadline, so pushes across it
    # fail (3 rounds, 1.5 s, ended before any did).
    subprocess.run(
        [sys.executable, str(script), "partition", "--hosts", "4", "--cut-rounds", "12",
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


def test_a_revocation_reaches_every_reachable_member_and_a_cut_off_one_after_the_heal(
    tmp_path: Path,
) -> None:
    """4 members (3 founders, k = 2, and one certified member, active and connected);
    founder 2 is cut off, and the certified member is revoked at founder 0: founders 0
    and 1 refuse its key (new log head, one member fewer, not connected), founder 2
    holds its old log for as long as the cut lasts (one sync interval longer than the
    others took), and refuses the key once the cut heals."""
    result, _ = scenario_revoke(4, 0, tmp_path, None, timeout=120.0)
    assert (result["cut_off_host"], result["cut_revoked_host"]) == (2, 3)
    reachable = result["cut_reachable_refuse_s"]
    assert sorted(reachable) == [0, 1]
    assert all(seconds is not None for seconds in reachable.values()), reachable
    assert result["cut_off_held_entry_before_heal"] is False
    assert result["cut_lasted_s"] > max(reachable.values())
    assert result["heal_until_cut_off_log_head_matches_s"] is not None
    assert result["heal_until_cut_off_refuses_s"] is not None
