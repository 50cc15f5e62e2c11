"""The lab's ``revoke`` scenario: how fast a revocation reaches every member (issue 22).

Every host runs a member of one network: the first hosts are founders (k = 2), the
last ``revocations + 1`` hold certificates that founders 0 and 1 signed with
``p2pfl member sign``. Once every node counts every member and each certified
member is connected and has its updates accepted:

1. ``revocations`` times, founders 0 and 1 revoke the next certified member
   (``p2pfl member revoke``, chained on node 0's log) and it is handed to one
   founder with ``p2pfl member publish`` (its inbox, taken within 0.25 s). Measured:
   seconds from the publish until each other member *refuses* the key, that is its
   /status shows the new log head, one member fewer, and the revoked peer neither
   connected nor a neighbour.
2. The last founder is cut off (:meth:`Lab.partition`), the last certified member
   is revoked the same way, the cut is held one sync interval longer than the
   others took, then healed. Measured: the same for the reachable members, whether
   the cut-off one ever held the entry before the heal, and its catch-up: seconds
   from the heal until its log head matches, and until it refuses the key.

Times are from the publish call's return to the /status answer that first shows
the refusal, read by one thread per host every :data:`POLL_S`; so they include the
inbox poll and are late by at most one poll. Nothing here asserts: the numbers go
to SECURITY.md; tests/test_netlab_revocation.py asserts the ordering.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gossip.keys import NodeKey
from gossip.member_formats import RevocationEntry
from gossip.membership import MemberSet
from p2pfl.lab.labwatch import Show
from p2pfl.lab.netlab import Lab, LabNetwork
from p2pfl.lab.netview import History, Row, Status, status_table
from p2pfl.member_service import SYNC_INTERVAL_S
from p2pfl.member_store import read_genesis, read_object

if TYPE_CHECKING:
    from p2pfl.lab.labrun import LabOptions

# Finer than the other scenarios' 0.5 s: the figures are fractions of a second.
POLL_S = 0.1
THRESHOLD = 2
SIGNERS = (0, 1)
Statuses = list[Status | None]


class RevocationLabError(Exception):
    """The network never got to where a revocation can be measured (named in the message)."""


def cli(*args: str) -> None:
    """Run ``p2pfl ARGS`` in this process (as an operator would, without its startup time)."""
    from p2pfl.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        if main(list(args)) != 0:
            raise RevocationLabError(f"p2pfl {' '.join(args)} failed")


@dataclass
class Cohort:
    """The network's files and who is who: founders first, then certified members."""

    directory: Path
    hosts: int
    founders: int
    ids: list[str] = field(default_factory=list)

    @property
    def genesis(self) -> Path:
        return self.directory / "genesis"

    def key(self, index: int) -> Path:
        return self.directory / f"node-{index}" / "node.key"

    def state_dir(self, index: int) -> Path:
        # LocalNetwork's layout: node-I/state.
        return self.directory / f"node-{index}" / "state"

    def enrol(self) -> dict[int, tuple[str, ...]]:
        """Keys, the genesis and the certificates; each node's ``--network``/``--cert`` flags."""
        for index in range(self.hosts):
            self.key(index).parent.mkdir(parents=True, exist_ok=True)
            key = NodeKey.generate()
            key.save(self.key(index))
            self.ids.append(key.peer_id)
        cli("network", "create", str(self.genesis), "--name", "lab", "--threshold",
            str(THRESHOLD), *[f"--founder={peer}" for peer in self.ids[:self.founders]])
        flags: dict[int, tuple[str, ...]] = {}
        for index in range(self.hosts):
            flags[index] = ("--network", str(self.genesis))
            if index >= self.founders:
                cert = self.directory / f"cert-{index}"
                sign = ("member", "sign", str(cert), "--network", str(self.genesis))
                cli(*sign, "--key", str(self.key(SIGNERS[0])), "--peer", self.ids[index],
                    "--org", f"org-{index}")
                cli(*sign, "--key", str(self.key(SIGNERS[1])))
                flags[index] += ("--cert", str(cert))
        return flags

    def revoke(self, target: int, number: int) -> RevocationEntry:
        """The entry revoking ``target``'s key, signed by k founders on node 0's log head."""
        path = self.directory / f"revocation-{number}"
        revoke = ("member", "revoke", str(path), "--network", str(self.genesis),
                  "--state-dir", str(self.state_dir(SIGNERS[0])))
        cli(*revoke, "--key", str(self.key(SIGNERS[0])), "--peer", self.ids[target])
        cli(*revoke, "--key", str(self.key(SIGNERS[1])))
        entry = read_object(path, RevocationEntry)
        assert isinstance(entry, RevocationEntry)
        return entry

    def publish(self, number: int, at: int) -> None:
        cli("member", "publish", str(self.directory / f"revocation-{number}"), "--state-dir",
            str(self.state_dir(at)))


def connected(status: Status) -> set[str]:
    reach = status.get("reachability") or {}
    return set(reach.get("direct_peers", [])) | set(reach.get("relayed_peers", {}))


def refuses(status: Status | None, peer: str, head: str, members: int) -> bool:
    """``status`` shows the log up to ``head``, ``members`` members, and ``peer`` cut off."""
    if status is None:
        return False
    view = status.get("membership") or {}
    return (view.get("member_log_head") == head and view.get("members_known") == members
            and peer not in connected(status) and peer not in status["neighbours"])


def log_head(status: Status | None) -> str | None:
    return None if status is None else (status.get("membership") or {}).get("member_log_head")


class Poller:
    """Every host's /status at once, each with the moment its answer arrived."""

    def __init__(self, lab: Lab, net: LabNetwork, history: History, show: Show | None) -> None:
        self.lab, self.net, self.history, self.show = lab, net, history, show

    def poll(self) -> tuple[Statuses, list[float]]:
        count = self.net.count
        statuses: Statuses = [None] * count
        at = [0.0] * count

        def fetch(index: int) -> None:
            node = self.net.nodes[index]
            if node is not None:
                statuses[index] = self.net.node_status(node)
            at[index] = time.monotonic()

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.history.record(statuses)
        if self.show is not None:
            rows = [Row(str(h.index), h.address, s)
                    for h, s in zip(self.lab.hosts, statuses, strict=True)]
            self.show(status_table(self.history.title, rows))
        return statuses, at

    def first_times(self, hosts: list[int], holds: Callable[[int, Status | None], bool],
                    since: float, timeout: float,
                    watch: Callable[[Statuses], None] | None = None) -> dict[int, float | None]:
        """Per host, seconds from ``since`` (monotonic) to the first answer where ``holds``."""
        first: dict[int, float | None] = dict.fromkeys(hosts)
        deadline = since + timeout
        while any(v is None for v in first.values()) and time.monotonic() < deadline:
            started = time.monotonic()
            statuses, at = self.poll()
            if watch is not None:
                watch(statuses)
            for index in hosts:
                if first[index] is None and holds(index, statuses[index]):
                    first[index] = round(at[index] - since, 3)
            time.sleep(max(0.0, POLL_S - (time.monotonic() - started)))
        return first

    def wait(self, done: Callable[[Statuses], bool], timeout: float, what: str) -> Statuses:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses, _ = self.poll()
            if done(statuses):
                return statuses
            time.sleep(POLL_S)
        raise RevocationLabError(f"not within {timeout:.0f} s: {what}")


def ready(cohort: Cohort, targets: list[int]) -> Callable[[Statuses], bool]:
    """Every node counts every member; each target is connected and its updates accepted."""

    def done(statuses: Statuses) -> bool:
        alive = [s for s in statuses if s is not None]
        if len(alive) < cohort.hosts or any(
                (s.get("membership") or {}).get("members_known") != cohort.hosts for s in alive):
            return False
        return all(any(cohort.ids[t] in connected(s) for s in alive)
                   and any(cohort.ids[t] in s["last_seq"] for s in alive) for t in targets)

    return done


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def scenario_revoke(hosts: int, revocations: int, directory: Path, show: Show | None, *,
                    timeout: float = 180.0, local_epochs: int = 1,
                    daemon_args: tuple[str, ...] = ()) -> tuple[Status, list[History]]:
    """Both measurements on one network of ``hosts`` members (module docstring)."""
    founders = hosts - revocations - 1
    if founders < len(SIGNERS) + 1:
        raise ValueError(f"{hosts} hosts leave {founders} founders for {revocations} "
                         "revocations; at least 3 are needed (2 signers, 1 cut off)")
    cohort = Cohort(directory, hosts, founders)
    flags = cohort.enrol()
    genesis = read_genesis(cohort.genesis)
    expected = MemberSet(genesis)  # the log every member should end up with
    targets = list(range(hosts - 1, founders - 1, -1))  # last host first
    cut_off = founders - 1
    history = History(f"revoke: {hosts} members ({founders} founders, k = {THRESHOLD})")
    load_before = os.getloadavg()
    with Lab(hosts) as lab, LabNetwork(
        lab, str(directory), rounds=None, degree=3, local_epochs=local_epochs,
        extra_args=("--send-timeout", "5", *daemon_args), node_args=flags,
    ) as net:
        net.start_all()
        history.mark("all up")
        poller = Poller(lab, net, history, show)
        poller.wait(ready(cohort, targets), timeout,
                    "every member known everywhere and every certified member active")
        revoked: list[int] = []

        def revoke(number: int, publisher: int) -> tuple[str, int, float]:
            target = targets[number]
            entry = cohort.revoke(target, number)
            if not isinstance(expected.extend_log([entry], int(time.time())), int):
                raise RevocationLabError(f"revocation {number} does not extend the log")
            revoked.append(target)
            history.mark(f"revoke h{target}")
            cohort.publish(number, publisher)
            return cohort.ids[target], hosts - len(revoked), time.monotonic()

        def others() -> list[int]:
            return [i for i in range(hosts) if i not in revoked]

        runs = []
        for number in range(revocations):
            publisher = number % founders
            peer, members, published = revoke(number, publisher)
            head = expected.head.head.hex()
            times = poller.first_times(
                others(), lambda _, s, p=peer, h=head, m=members: refuses(s, p, h, m),
                published, timeout)
            rest = [t for i, t in times.items() if i != publisher]
            done = [t for t in rest if t is not None]
            runs.append({"revoked": targets[number], "publisher": publisher,
                         "publisher_s": times[publisher],
                         "first_other_s": min(done, default=None),
                         "all_s": max(done) if len(done) == len(rest) else None,
                         "per_host_s": times})

        # Part 2: one founder cut off while the next revocation spreads.
        old_head = log_head(poller.poll()[0][cut_off])
        lab.partition([[i for i in range(hosts) if i != cut_off], [cut_off]])
        history.mark(f"cut h{cut_off}")
        peer, members, published = revoke(revocations, 0)
        head = expected.head.head.hex()
        reachable = [i for i in others() if i != cut_off]
        leaked: list[str] = []

        def cut_off_unchanged(statuses: Statuses) -> None:
            # A node cut off must not learn the entry: anything else means the cut leaks.
            if log_head(statuses[cut_off]) not in (old_head, None):
                leaked.append(str(log_head(statuses[cut_off])))

        cut_times = poller.first_times(
            reachable, lambda _, s: refuses(s, peer, head, members), published, timeout,
            cut_off_unchanged)
        # Hold the cut one periodic sync longer, so "not before the heal" is not luck.
        hold_until = time.monotonic() + SYNC_INTERVAL_S + 1.0
        while time.monotonic() < hold_until:
            cut_off_unchanged(poller.poll()[0])
            time.sleep(POLL_S)
        cut_lasted = time.monotonic() - published
        lab.heal()
        healed = time.monotonic()
        history.mark("heal")
        catch_up = poller.first_times(
            [cut_off], lambda _, s: log_head(s) == head, healed, timeout)
        refused = poller.first_times(
            [cut_off], lambda _, s: refuses(s, peer, head, members), healed, timeout)
    done = [t for t in cut_times.values() if t is not None]
    all_s = [r["all_s"] for r in runs if r["all_s"] is not None]
    first_s = [r["first_other_s"] for r in runs if r["first_other_s"] is not None]
    return {
        "scenario": "revoke",
        "hosts": hosts,
        "founders": founders,
        "threshold": THRESHOLD,
        "certified_members": hosts - founders,
        "load_average_1min_before_after": [round(load_before[0], 1),
                                           round(os.getloadavg()[0], 1)],
        "revocations": runs,
        "every_member_refuses_s": all_s,
        "every_member_refuses_s_spread": spread(all_s),
        "first_other_member_refuses_s": first_s,
        "cut_off_host": cut_off,
        "cut_revoked_host": revoked[-1],
        "cut_reachable_refuse_s": cut_times,
        "cut_every_reachable_refuses_s": None if len(done) < len(reachable) else max(done),
        "cut_lasted_s": round(cut_lasted, 2),
        "cut_off_held_entry_before_heal": bool(leaked),
        "heal_until_cut_off_log_head_matches_s": catch_up[cut_off],
        "heal_until_cut_off_refuses_s": refused[cut_off],
    }, [history]


def run_revoke(options: LabOptions, directory: Path, show: Show | None) -> tuple[Status,
                                                                          list[History]]:
    """``scripts/netlab.py revoke``: the scenario with the lab's options."""
    return scenario_revoke(options.hosts, options.revocations, directory, show,
                           timeout=options.timeout, daemon_args=options.daemon_args)
