"""Pins on every py-libp2p internal that p2pfl/libp2p_compat.py relies on.

Each private name the module touches is pinned here by the hash of its source (a
change of any kind fails the test and names what to re-read), and the instance
attributes by their presence and type on real objects. When one fails, read the new
code, re-check the override in libp2p_compat.py, then update the hash.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.rcmgr.manager import ConnectionScope, ResourceManager
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayResourceManager, Reservation
from libp2p.relay.circuit_v2.transport import CircuitV2Transport, TrackedRawConnection
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from gossip.keys import NodeKey
from p2pfl import libp2p_compat
from p2pfl.libp2p_compat import GuardedRelayProtocol
from p2pfl.relay import RelayPolicy, relay_limits
from p2pfl.transport import Transport

pytestmark = pytest.mark.integration

LOOPBACK = "/ip4/127.0.0.1/tcp/0"

# What libp2p_compat relies on in each (first 16 hex digits of sha256 of the source).
PINNED: dict[str, tuple[Callable[..., Any], str]] = {
    # our constructor call: (host, limits=, allow_hop=); sets resource_manager, write_timeout
    "CircuitV2Protocol.__init__": (CircuitV2Protocol.__init__, "4e75d071bd9e3d3e"),
    # dispatches RESERVE to self._handle_reserve and CONNECT to self._handle_connect,
    # and refuses HOP requests over relayed connections before either
    "CircuitV2Protocol._handle_hop_stream": (
        CircuitV2Protocol._handle_hop_stream, "a28ce9cea8920661"
    ),
    # _reservations: dict[ID, Reservation], the table we prune and release from
    "RelayResourceManager.__init__": (RelayResourceManager.__init__, "630b7a6b27d47250"),
    "RelayResourceManager._clean_expired": (
        RelayResourceManager._clean_expired, "643b17ff8c593989"
    ),
    "RelayResourceManager._is_peer_connected": (
        RelayResourceManager._is_peer_connected, "16e62ab704408a6c"
    ),
    # reserve() creates the entry (via create_reservation); refresh_reservation renews
    "RelayResourceManager.reserve": (RelayResourceManager.reserve, "9c6bf9889d033117"),
    "RelayResourceManager.refresh_reservation": (
        RelayResourceManager.refresh_reservation, "64cf73bc83f758f3"
    ),
    "RelayResourceManager.create_reservation": (
        RelayResourceManager.create_reservation, "652fe8b28ec5a519"
    ),
    # Reservation.addrs, set before to_proto() puts it in the answer
    "Reservation.__init__": (Reservation.__init__, "505672b70d9bd382"),
    "Reservation.to_proto": (Reservation.to_proto, "61a373a7d447adfa"),
    # _reservations and _reservation_proofs: dicts keyed by the relay's ID
    "CircuitV2Transport.__init__": (CircuitV2Transport.__init__, "f1ec2ac4db379c6a"),
    # route_inbound_connections: the listener's closure looks _handle_inbound_connection
    # up on the swarm at every accepted socket; its signature is (socket, maddr)
    "Swarm.listen": (Swarm.listen, "c23f133cd5acc0a9"),
    "Swarm._handle_inbound_connection": (
        Swarm._handle_inbound_connection, "0800fdf9770ed8e6"
    ),
    # wraps the socket in RawConnection(socket, False), then holds the handler until
    # the swarm ends (why the gate ends it when the socket closes)
    "Swarm._do_handle_inbound_connection": (
        Swarm._do_handle_inbound_connection, "c22fdfd5289f671c"
    ),
    # InboundSocket: RawConnection.stream is our socket; close() closes it
    "RawConnection.__init__": (RawConnection.__init__, "89beb8adac60eaa6"),
    "RawConnection.close": (RawConnection.close, "c9e6cae411277ac0"),
    # InboundSocket.wait_readable: TrioTCPStream.stream is trio's SocketStream
    "TrioTCPStream.__init__": (TrioTCPStream.__init__, "4222fa993846189e"),
    # relay_under walks Yamux.secured_conn -> SecureSession.conn ->
    # TrackedRawConnection._wrapped -> RawConnection.stream
    "TrackedRawConnection.__init__": (TrackedRawConnection.__init__, "5bd9adaa9a471302"),
    "SecureSession.__init__": (SecureSession.__init__, "b076c07a6dc2251b"),
    "Yamux.__init__": (Yamux.__init__, "3b11a2a71ca444ca"),
    # gating._GatedScope: the swarm only calls close() on the scope the admission hook
    # returns (SwarmConn.close), and libp2p's scope releases through close()
    "ResourceManager.open_connection": (
        ResourceManager.open_connection, "09622e1d99af297b"
    ),
    "SwarmConn.close": (SwarmConn.close, "442c6259a8e9e45e"),
    "ConnectionScope.close": (ConnectionScope.close, "a46660a07bed13a1"),
}  # fmt: skip


def _digest(function: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def test_the_installed_libp2p_is_the_pinned_version() -> None:
    import importlib.metadata

    assert importlib.metadata.version("libp2p") == libp2p_compat.LIBP2P_VERSION == "0.8.1"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_each_patched_libp2p_internal_is_unchanged(name: str) -> None:
    function, digest = PINNED[name]
    assert _digest(function) == digest, f"py-libp2p changed {name}: re-read libp2p_compat.py"


def test_the_overridden_handlers_are_the_ones_libp2p_dispatches_to() -> None:
    source = inspect.getsource(CircuitV2Protocol._handle_hop_stream)
    assert "await self._handle_reserve(stream, hop_msg)" in source
    assert "await self._handle_connect(stream, hop_msg)" in source
    for name in ("_handle_reserve", "_handle_connect"):
        base = inspect.signature(getattr(CircuitV2Protocol, name))
        ours = inspect.signature(getattr(GuardedRelayProtocol, name))
        assert list(base.parameters) == list(ours.parameters)


async def test_the_instance_attributes_touched_exist_with_their_types() -> None:
    async with Transport.open(NodeKey.generate(), [LOOPBACK]) as transport:
        protocol = GuardedRelayProtocol(transport.host, relay_limits(), True, RelayPolicy())
        manager = protocol.resource_manager
        assert isinstance(manager, RelayResourceManager)
        assert isinstance(manager._reservations, dict)
        assert isinstance(protocol.write_timeout, int)
        client = CircuitV2Transport(transport.host, protocol, RelayConfig(roles=RelayRole.STOP))
        assert isinstance(client._reservations, dict)
        assert isinstance(client._reservation_proofs, dict)
        relay = ID.from_base58(NodeKey.generate().peer_id)
        client._reservations[relay] = 1.0
        libp2p_compat.forget_client_reservation(client, relay)
        assert client._reservations == {}


def test_another_libp2p_version_fails_the_import_in_one_line() -> None:
    script = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: '0.9.0' if name == 'libp2p' else real(name)\n"
        "import p2pfl.libp2p_compat\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: p2pfl needs libp2p==0.8.1 (it patches its relay internals), "
        "found libp2p==0.9.0"
    )


async def test_unpatched_libp2p_still_stores_forged_reservations() -> None:
    """Why GuardedRelayProtocol exists: libp2p 0.8.1's own handler keeps an entry for
    a forged ``peer`` field. When this fails, libp2p fixed it: drop the override."""
    with trio.fail_after(30):
        async with (
            Transport.open(NodeKey.generate(), [LOOPBACK]) as relay,
            Transport.open(NodeKey.generate(), [LOOPBACK]) as attacker,
        ):
            protocol = CircuitV2Protocol(relay.host, relay_limits(), allow_hop=True)
            async with background_trio_service(protocol):
                await attacker.connect(relay.addrs[0], 5.0)
                stream = await attacker.host.new_stream(ID.from_base58(relay.peer_id), [HOP])
                forged = ID.from_base58(NodeKey.generate().peer_id)
                peer = CircuitPeerId(id=forged.to_bytes())
                request = HopMessage(type=HopMessage.RESERVE, peer=peer)
                await write_delimited_msg(stream, request)
                await read_delimited_msg(stream, HopMessage)
                assert forged in protocol.resource_manager._reservations


def test_the_listener_looks_the_inbound_handler_up_on_the_swarm() -> None:
    """route_inbound_connections rebinds an instance attribute: it only takes effect
    because the listener's closure reads it at every connection."""
    assert "await self._handle_inbound_connection(read_write_closer, _maddr)" in (
        inspect.getsource(Swarm.listen)
    )
    assert "RawConnection(read_write_closer, False)" in inspect.getsource(
        Swarm._do_handle_inbound_connection
    )


async def test_the_inbound_socket_wrapper_reaches_the_real_socket() -> None:
    """InboundSocket.wait_readable finds trio's socket under libp2p's TCP stream (else
    it waits for nothing and the first-byte gate is off)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
    server_socket, _ = await listener.accept()
    wrapped = libp2p_compat.InboundSocket(TrioTCPStream(trio.SocketStream(server_socket)))
    assert not await wrapped.wait_readable(0.05)
    await client.send_all(b"x")
    assert await wrapped.wait_readable(1.0)
    assert wrapped.get_remote_address() is not None
    await wrapped.close()
    assert wrapped.closed.is_set()
    await client.aclose()
    listener.close()


# -- nothing else touches libp2p's internals ----------------------------------------------

PACKAGE = Path(__file__).resolve().parent.parent / "p2pfl"
COMPAT = PACKAGE / "libp2p_compat.py"
# Private attributes of our own objects read from outside their class (not libp2p's).
OWN_PRIVATE_READS = {("localnet.py", "node._reader")}


def _findings(path: Path) -> Iterator[str]:
    """What in ``path`` looks like reaching into a library's internals: ``x._name`` on
    anything but self/cls, getattr/setattr/__dict__ in a module that imports libp2p, and
    rebinding an attribute of another object to a function (a monkey-patch)."""
    tree = ast.parse(path.read_text(), str(path))
    uses_libp2p = any(
        (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("libp2p"))
        or (isinstance(node, ast.Import) and any(a.name.startswith("libp2p") for a in node.names))
        for node in ast.walk(tree)
    )
    # Functions defined inside functions: what a monkey-patch assigns.
    functions = {
        inner.name
        for outer in ast.walk(tree) if isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef)
        for statement in outer.body for inner in ast.walk(statement)
        if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef)
    }  # fmt: skip
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if private and not own and (path.name, ast.unparse(node)) not in OWN_PRIVATE_READS:
                yield f"{where} {ast.unparse(node)}"
            if node.attr == "__dict__":
                yield f"{where} {ast.unparse(node)}"
        if uses_libp2p and isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "setattr", "delattr"):
                yield f"{where} {ast.unparse(node)}"
        if isinstance(node, ast.Assign):
            patch = isinstance(node.value, ast.Lambda) or (
                isinstance(node.value, ast.Name) and node.value.id in functions
            )
            for target in node.targets:
                own = isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and (
                    target.value.id in ("self", "cls")
                )
                if patch and isinstance(target, ast.Attribute) and not own:
                    yield f"{where} {ast.unparse(node)}"


def test_only_the_compat_module_touches_libp2p_internals() -> None:
    modules = [path for path in sorted(PACKAGE.rglob("*.py")) if path != COMPAT]
    assert len(modules) > 20
    found = [finding for path in modules for finding in _findings(path)]
    assert found == [], "move these into p2pfl/libp2p_compat.py (and pin them): " + "; ".join(
        found
    )


def test_the_internals_check_catches_a_patch(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from libp2p.network.swarm import Swarm\n"
        "def install(swarm, connection):\n"
        "    async def guarded(a, b): ...\n"
        "    swarm._handle_inbound_connection = guarded\n"
        "    connection.close = guarded\n"
        "    getattr(connection, 'stream', None)\n"
    )
    assert len(list(_findings(sample))) == 4  # the private name twice: read and patch


def test_the_network_modules_stay_under_500_lines() -> None:
    names = [
        "transport.py", "dialling.py", "inbound.py", "streams.py", "gating.py",
        "handshakes.py", "libp2p_compat.py", "relay.py", "peer_exchange.py", "host.py",
    ]  # fmt: skip
    lines = {name: len((PACKAGE / name).read_text().splitlines()) for name in names}
    assert {name: n for name, n in lines.items() if n > 500} == {}
