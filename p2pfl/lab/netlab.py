"""A network lab in the kernel: hosts in namespaces, rate limits, loss, NAT, partitions.

Every host is a network namespace with its own IP. Public hosts hang off a bridge in a
"core" namespace; each NAT group sits behind a router namespace that masquerades
toward the core (keeping source ports, as nft masquerade does) and drops unsolicited
inbound packets without an answer, as most home and office NATs do. Nothing is joined
to the machine's own namespace or uplink, and no route leaves ``10.77.0.0/16``, so lab
traffic stays in the lab.

Built with ``ip``, ``tc`` and ``nft`` (subprocess, nothing at the packet level):
- a per-host rate is a ``tbf`` qdisc on both ends of the host's link;
- a partition moves bridge ports onto separate bridges (no ``nft`` needed): frames
  across the cut are silently dropped, exactly as on a real split network, and the
  heal moves them back;
- loss (``numgen random ... drop``) and NAT (``masquerade``) need nftables;
  :func:`nft_missing_reason` says so in one line.

Every namespace is named ``p2lab-<pid>-...`` after the process that made it; links and
nft tables live inside those namespaces, so deleting them removes everything. A new
lab first deletes namespaces of labs whose process is gone (Ctrl-C is handled by the
context manager; SIGKILL leaves them for the next run).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from p2pfl.lab.localnet import LocalNetwork, LocalNode
from p2pfl.lab.namespaces import (
    PREFIX,
    LabError,
    cleanup_leftovers,
    delete_namespace,
    lab_namespaces,
    nft_missing_reason,
    run_command,
    run_in_netns,
)

LAB_NET = "10.77"
LISTEN_PORT = 4001
# Hosts are .10 upward in their /24; NAT routers take .200 upward on the core bridge.
MAX_HOSTS = 190
# tbf needs a bucket of at least one MTU-sized packet per timer tick; 32 kB fits
# rates up to 100 Mbit/s, and 50 ms of queue keeps latency from growing unbounded.
TBF_BURST = "32kb"
TBF_LATENCY = "50ms"
# A new veth gets its carrier from the kernel's link watcher about 1 s after it is up;
# packets sent before that are lost, so a lab is ready only when every link is up.
CARRIER_TIMEOUT_S = 10.0
NAT_PORTS = ("keep", "random")

_T = TypeVar("_T")





@dataclass(frozen=True)
class LabHost:
    index: int
    namespace: str
    address: str
    nat: int | None
    """Index of the NAT this host sits behind; None for a public host."""

    @property
    def listen(self) -> str:
        return f"/ip4/{self.address}/tcp/{LISTEN_PORT}"


class Lab:
    """``hosts`` namespaces on one bridge, some behind NATs; use it as a context manager.

    ``nats`` lists the host indices behind each NAT router (needs nftables); the routers
    keep source ports (``nat_ports="keep"``, as most NATs do, so hole punching can
    work) or pick a random one per connection (``"random"``, a symmetric NAT that
    defeats it). ``rate_mbit``
    limits every host's link in both directions; ``loss_percent`` drops that share of
    every host's inbound packets (needs nftables).
    """

    def __init__(
        self,
        hosts: int,
        *,
        nats: Sequence[Sequence[int]] = (),
        rate_mbit: float | None = None,
        loss_percent: float = 0.0,
        nat_ports: str = "keep",
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"a lab has 1 to {MAX_HOSTS} hosts")
        natted = [index for group in nats for index in group]
        if len(set(natted)) != len(natted) or not all(0 <= i < hosts for i in natted):
            raise ValueError("each NATed host must be a distinct host index")
        if (nats or loss_percent) and (reason := nft_missing_reason()):
            raise LabError(reason)
        if not 0.0 <= loss_percent < 100.0:
            raise ValueError("loss_percent must be in [0, 100)")
        if nat_ports not in NAT_PORTS:
            raise ValueError(f"nat_ports must be one of {', '.join(NAT_PORTS)}")
        self.nat_ports = nat_ports
        self.tag = f"{PREFIX}-{os.getpid()}"
        self.core = f"{self.tag}-core"
        self.nats = [list(group) for group in nats]
        self.rate_mbit = rate_mbit
        self.loss_percent = loss_percent
        self.bridges = 1
        self._port_bridge: dict[str, str] = {}
        self.hosts: list[LabHost] = []
        for index in range(hosts):
            nat = next((k for k, group in enumerate(self.nats) if index in group), None)
            if nat is None:
                address = f"{LAB_NET}.0.{10 + index}"
            else:
                address = f"{LAB_NET}.{nat + 1}.{10 + index}"
            self.hosts.append(LabHost(index, f"{self.tag}-h{index}", address, nat))

    def __enter__(self) -> Lab:
        cleanup_leftovers()
        try:
            self._build()
            self._wait_for_carrier()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # -- building -------------------------------------------------------------------------

    def _ip(self, namespace: str, *args: str) -> None:
        run_command(["ip", "-n", namespace, *args])

    def _add_namespace(self, name: str) -> None:
        run_command(["ip", "netns", "add", name])
        self._ip(name, "link", "set", "lo", "up")

    def _limit(self, namespace: str, device: str) -> None:
        if self.rate_mbit is None:
            return
        run_command([
            "tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
            "rate", f"{self.rate_mbit}mbit", "burst", TBF_BURST, "latency", TBF_LATENCY,
        ])  # fmt: skip

    def limit_rate(self, rate_mbit: float | None) -> None:
        """Give every host's link this rate from now on (None: unlimited), at both ends.

        For measuring a formed network: the daemons join on fast links, then the
        links slow down.
        """
        self.rate_mbit = rate_mbit
        for host in self.hosts:
            outer = self.core if host.nat is None else f"{self.tag}-nat{host.nat}"
            for namespace, device in ((host.namespace, "eth0"), (outer, f"h{host.index}")):
                if rate_mbit is None:
                    run_command(["tc", "-n", namespace, "qdisc", "del", "dev", device, "root"],
                         check=False)
                else:
                    self._limit(namespace, device)

    def _link(self, inner_ns: str, outer_ns: str, port: str, bridge: str, address: str) -> None:
        """A veth from ``inner_ns`` (named eth0, with ``address``) to ``bridge`` in ``outer_ns``."""
        run_command([
            "ip", "link", "add", "eth0", "netns", inner_ns, "type", "veth",
            "peer", "name", port, "netns", outer_ns,
        ])  # fmt: skip
        self._ip(inner_ns, "addr", "add", address, "dev", "eth0")
        self._ip(inner_ns, "link", "set", "eth0", "up")
        self._ip(outer_ns, "link", "set", port, "master", bridge, "up")
        if outer_ns == self.core:
            self._port_bridge[port] = bridge
        self._limit(inner_ns, "eth0")
        self._limit(outer_ns, port)

    def _nft(self, namespace: str, *commands: str) -> None:
        for command in commands:
            run_command(["ip", "netns", "exec", namespace, "nft", command])

    def _build(self) -> None:
        self._add_namespace(self.core)
        self._add_bridge(self.core, "br0")
        for k, _group in enumerate(self.nats):
            router = f"{self.tag}-nat{k}"
            self._add_namespace(router)
            self._add_bridge(router, "lan", f"{LAB_NET}.{k + 1}.1/24")
            # The router's uplink is a plain interface, not a bridge port, so its
            # "wan" veth joins the core bridge like a host's.
            run_command([
                "ip", "link", "add", "wan", "netns", router, "type", "veth",
                "peer", "name", f"nat{k}", "netns", self.core,
            ])  # fmt: skip
            self._ip(router, "addr", "add", f"{LAB_NET}.0.{200 + k}/24", "dev", "wan")
            self._ip(router, "link", "set", "wan", "up")
            self._ip(self.core, "link", "set", f"nat{k}", "master", "br0", "up")
            self._port_bridge[f"nat{k}"] = "br0"
            run_command(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            self._nft(
                router,
                f"add table ip {PREFIX}",
                f"add chain ip {PREFIX} post {{ type nat hook postrouting priority 100 ; }}",
                f"add rule ip {PREFIX} post oifname wan masquerade"
                + (" fully-random" if self.nat_ports == "random" else ""),
                # Like a home or office NAT: unsolicited inbound is dropped without an
                # answer (a refusal would reset a hole punch's simultaneous open).
                *(
                    command
                    for hook in ("input", "forward")
                    for command in (
                        f"add chain ip {PREFIX} {hook} {{ type filter hook {hook} priority 0 ; }}",
                        f"add rule ip {PREFIX} {hook} iifname wan ct state established,related "
                        "accept",
                        f"add rule ip {PREFIX} {hook} iifname wan drop",
                    )
                ),
            )
        for host in self.hosts:
            self._add_namespace(host.namespace)
            if host.nat is None:
                self._link(host.namespace, self.core, f"h{host.index}", "br0", f"{host.address}/24")
            else:
                router = f"{self.tag}-nat{host.nat}"
                self._link(host.namespace, router, f"h{host.index}", "lan", f"{host.address}/24")
                # Only the lab's range, never a default route: nothing can leave the lab.
                gateway = f"{LAB_NET}.{host.nat + 1}.1"
                self._ip(host.namespace, "route", "add", f"{LAB_NET}.0.0/16", "via", gateway)
            if self.loss_percent:
                # numgen draws 0..9999, so loss has a resolution of 0.01 %.
                self._nft(
                    host.namespace,
                    f"add table inet {PREFIX}",
                    f"add chain inet {PREFIX} in {{ type filter hook input priority 0 ; }}",
                    # Loopback is exempt: it is the host's own traffic, not a link.
                    f"add rule inet {PREFIX} in iifname != lo numgen random mod 10000 < "
                    f"{round(self.loss_percent * 100)} drop",
                )

    def _wait_for_carrier(self) -> None:
        deadline = time.monotonic() + CARRIER_TIMEOUT_S
        for namespace in self.namespaces():
            while True:
                shown = run_command(["ip", "-n", namespace, "-j", "link", "show"])
                links = json.loads(shown.stdout)
                down = [link["ifname"] for link in links if link.get("operstate") == "DOWN"]
                if not down:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"links {down} in {namespace} have no carrier after "
                                   f"{CARRIER_TIMEOUT_S:.0f} s")
                time.sleep(0.05)

    def _add_bridge(self, namespace: str, name: str, address: str | None = None) -> None:
        self._ip(namespace, "link", "add", name, "type", "bridge")
        if address is not None:
            self._ip(namespace, "addr", "add", address, "dev", name)
        self._ip(namespace, "link", "set", name, "up")

    # -- partitions -----------------------------------------------------------------------

    def _core_port(self, index: int) -> str:
        nat = self.hosts[index].nat
        return f"h{index}" if nat is None else f"nat{nat}"

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Cut the lab into ``groups`` of host indices; hosts in no group stay with the first.

        Each group's ports move to a bridge of its own, so frames across the cut are
        dropped without an answer, as on a real split. A NAT's hosts move together.
        """
        for group in groups:
            for index in group:
                nat = self.hosts[index].nat
                if nat is not None and not set(self.nats[nat]) <= set(group):
                    raise ValueError(f"NAT {nat}'s hosts {self.nats[nat]} must be cut together")
        for number, group in enumerate(groups):
            bridge = f"br{number}"
            if number >= self.bridges:
                self._add_bridge(self.core, bridge)
                self.bridges += 1
            for index in group:
                self._move(self._core_port(index), bridge)

    def heal(self) -> None:
        """Join every host to one bridge again."""
        for port in sorted(self._port_bridge):
            self._move(port, "br0")

    def _move(self, port: str, bridge: str) -> None:
        # Re-enslaving a port to its own bridge is not a no-op (the port flaps and
        # drops a packet or two), so only ports that change sides move.
        if self._port_bridge.get(port) != bridge:
            self._ip(self.core, "link", "set", port, "master", bridge)
            self._port_bridge[port] = bridge

    # -- using it -------------------------------------------------------------------------

    def exec_prefix(self, index: int) -> list[str]:
        """Prepend to a command to run it on host ``index``."""
        return ["ip", "netns", "exec", self.hosts[index].namespace]

    def run(self, index: int, function: Callable[[], _T]) -> _T:
        """Call ``function`` with host ``index``'s network (see :func:`run_in_netns`)."""
        return run_in_netns(self.hosts[index].namespace, function)

    def tcp_connections(self, index: int) -> str:
        """``ss -tni`` on host ``index``: TCP states, rto and backoff of every connection."""
        return run_command([*self.exec_prefix(index), "ss", "-tni"]).stdout

    def namespaces(self) -> list[str]:
        return [name for name in lab_namespaces() if name.startswith(f"{self.tag}-")]

    def teardown(self) -> None:
        """Delete every namespace of this lab (with its links, qdiscs, tables and processes)."""
        for name in self.namespaces():
            delete_namespace(name)


@contextlib.contextmanager
def serving_in(
    lab: Lab, index: int, serve: Callable[[Any, list[str]], Awaitable[None]]
) -> Iterator[list[str]]:
    """Run ``await serve(stop, addrs)`` under trio on host ``index`` in a thread for the
    duration of the block; ``serve`` puts what others need (its addresses) into
    ``addrs``, which the block gets once it is not empty, and returns once ``stop``
    (a ``trio.Event``) is set at the block's end."""
    import trio

    leave, addrs = threading.Event(), []
    failure: list[BaseException] = []

    async def main() -> None:
        stop = trio.Event()

        async def watch() -> None:
            await trio.to_thread.run_sync(leave.wait)
            stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await serve(stop, addrs)
            nursery.cancel_scope.cancel()

    def run() -> None:
        try:
            lab.run(index, lambda: trio.run(main))
        except BaseException as error:  # handed to the caller's thread below
            failure.append(error)

    thread = threading.Thread(target=run, name=f"lab-serve-{index}")
    thread.start()
    try:
        while not addrs and thread.is_alive():
            time.sleep(0.05)
        if failure:
            raise failure[0]
        yield addrs
    finally:
        leave.set()
        thread.join()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so ``with Lab(...)`` tears down on it too."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LabNetwork(LocalNetwork):
    """Real daemons, one per lab host, listening on the host's own address.

    Built on :class:`LocalNetwork` (state dirs, keys, start, stop); only the command
    differs (the host's listen address, run inside its namespace), and /status is read
    from inside each host's namespace.
    """

    def __init__(self, lab: Lab, directory: str, **options: Any) -> None:
        super().__init__(directory, len(lab.hosts), **options)
        self.lab = lab

    def node_settings(self, index: int, bootstrap: str | None) -> dict[str, Any]:
        listen = (self.lab.hosts[index].listen,)
        return {**super().node_settings(index, bootstrap), "listen": listen}

    def command(self, index: int, bootstrap: str | None) -> list[str]:
        return self.lab.exec_prefix(index) + super().command(index, bootstrap)

    def node_status(self, node: LocalNode) -> dict[str, Any] | None:
        return self.lab.run(node.index, partial(node.status, 1.0))

    def statuses(self) -> list[dict[str, Any] | None]:
        """Every node's /status, fetched in parallel (one thread per host namespace)."""
        results: list[dict[str, Any] | None] = [None] * self.count

        def fetch(index: int) -> None:
            node = self.nodes[index]
            if node is not None:
                results[index] = self.node_status(node)

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(self.count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results


def wide_digits(seed: int = 0) -> Any:
    """The digits task with an MLP 64-1024-1024-10 (1.1M parameters, 4.5 MB raw).

    For the lab's slow-link scenario: ``--task p2pfl.lab.netlab:wide_digits``.
    """
    from dataclasses import replace

    from fltasks.datasets import digits, mlp

    task = digits(seed=seed)
    return replace(task, name="wide-digits", make_model=partial(mlp, (64, 1024, 1024, 10), seed))
