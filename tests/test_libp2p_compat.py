"""Pins on every py-libp2p internal that p2pfl/libp2p_compat.py relies on.

Each private name the module touches is pinned here by the hash of its source (a
change of any kind fails the test and names what to re-read), and the instance
attributes by their presence and type on real objects. When one fails, read the new
code, re-check the override in libp2p_compat.py, then update the hash.
"""

from __future__ import annotations

import hashlib
import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayResourceManager, Reservation
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from gossip.keys import NodeKey
from p2pfl import libp2p_compat
from p2pfl.libp2p_compat import GuardedRelayProtocol
from p2pfl.relay import RelayPolicy, relay_limits
from p2pfl.transport import Transport

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
