"""Attack tools for tests: cheap connections from throwaway keys, raw TCP that never speaks,
and allow files for a member that hides from one victim.

They use libp2p's own TCP transport and upgrader, exactly what a dialing host does,
but one fresh identity per connection and no host around it, so hundreds of
connections cost the attacker no more than their handshakes.
"""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.upgrader import TransportUpgrader
from multiaddr import Multiaddr

from gossip.keys import NodeKey
from p2pfl.host import split_peer_multiaddr

# The attacker's patience per step, not a bound under test: on a loaded machine 400
# dials from one process took over 5 s, and all 400 counted as unreached.
STEP_TIMEOUT_S = 30.0


UNREACHED = "unreached"
CUT = "cut"
UPGRADED = "upgraded"


async def open_throwaway_noise(
    target: str, stack: AsyncExitStack, key_type: str = "ed25519"
) -> str:
    """Dial ``target`` with a fresh key (``ed25519`` or ``secp256k1``), do Noise and pick
    yamux. Returns UNREACHED (no TCP connection), CUT (the target ended it before the
    muxer was chosen) or UPGRADED. The connection is left open (idle) until ``stack``
    closes."""
    peer_id, addr = split_peer_multiaddr(target)
    key_pair = create_new_key_pair() if key_type == "ed25519" else create_secp256k1_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    upgrader = TransportUpgrader(
        {TProtocol(NOISE_PROTOCOL_ID): noise}, {TProtocol(YAMUX_PROTOCOL_ID): Yamux}
    )
    raw = None
    with trio.move_on_after(STEP_TIMEOUT_S):
        try:
            raw = await TCP().dial(Multiaddr(str(addr)))
        except Exception:
            return UNREACHED
        stack.push_async_callback(_close, raw)
        try:
            secured = await upgrader.upgrade_security(raw, True, ID.from_base58(peer_id))
            await upgrader.upgrade_connection(secured, ID.from_base58(peer_id))
        except Exception:
            return CUT
        return UPGRADED
    return UNREACHED if raw is None else CUT


async def open_silent_tcp(target: str, stack: AsyncExitStack) -> None:
    """A TCP connection to ``target`` that never sends a byte, held until ``stack`` closes."""
    _, addr = split_peer_multiaddr(target)
    host = addr.value_for_protocol("ip4")
    port = int(addr.value_for_protocol("tcp"))
    stream = await trio.open_tcp_stream(host, port)
    stack.push_async_callback(stream.aclose)


async def _close(connection: object) -> None:
    with trio.move_on_after(1.0):
        try:
            await connection.close()  # type: ignore[attr-defined]
        except Exception:
            pass


# -- a member that hides from one victim (issue 20, part 5) ------------------------------
#
# Not hostile code at all: a stock daemon whose allow file lists every member but the
# victim. Its connection gate closes the victim's connections right after Noise, its
# peer book never records the victim, and it never dials or pushes to it; to everyone
# else it is a normal member. Ranked over first-hand views, that split the others' view
# of the ring from the victim's and starved the victim's quorum.


def seeded_keys(directory: Path, count: int, tag: str) -> list[str]:
    """Write ``node-<i>/node.key`` for a LocalNetwork in ``directory``, from ``tag``:
    the same tag gives the same keys, so a clean and an attacked run can be compared.
    Returns the peer ids."""
    peer_ids = []
    for index in range(count):
        key = NodeKey(hashlib.sha256(f"{tag}-{index}".encode()).digest())
        node_dir = directory / f"node-{index}"
        node_dir.mkdir(parents=True, exist_ok=True)
        key.save(node_dir / "node.key")
        peer_ids.append(key.peer_id)
    return peer_ids


def allow_args(
    directory: Path, peer_ids: list[str], hider: int | None = None, victim: int | None = None
) -> dict[int, tuple[str, ...]]:
    """LocalNetwork ``node_args``: ``--allow`` with every member for each node, except
    that ``hider``'s file leaves out ``victim`` (with ``hider`` None, a clean run)."""
    everyone = directory / "allow.txt"
    everyone.write_text("".join(f"{peer_id}\n" for peer_id in peer_ids))
    args = {index: ("--allow", str(everyone)) for index in range(len(peer_ids))}
    if hider is not None and victim is not None:
        hiding = directory / "allow-hider.txt"
        listed = [p for i, p in enumerate(peer_ids) if i != victim]
        hiding.write_text("".join(f"{peer_id}\n" for peer_id in listed))
        args[hider] = ("--allow", str(hiding))
    return args
