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
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
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


# Source addresses of a many-IP attack: Linux routes all of 127/8 to loopback, so a
# socket bound to 127.0.0.N reaches a node on 127.0.0.1 from a distinct IP.
def loopback_ips(count: int, first: int = 2) -> list[str]:
    if not (1 <= first and first + count - 1 <= 254):
        raise ValueError("the attack's addresses must stay within 127.0.0.1-254")
    return [f"127.0.0.{n}" for n in range(first, first + count)]


# The attack of issue 20: each cut connection is re-opened this long after the cut.
REOPEN_AFTER_S = 0.2


async def hold_silent_tcp(
    target: str,
    source_ip: str,
    stop: trio.Event,
    cuts: list[int],
    *,
    max_opens: int,
    reopen_after: float = REOPEN_AFTER_S,
) -> None:
    """Keep one silent TCP connection from ``source_ip`` open on ``target``: when the
    target cuts it, open another ``reopen_after`` later. Bounded: stops at ``stop`` or
    after ``max_opens`` connections; ``cuts[0]`` counts the cuts seen."""
    _, addr = split_peer_multiaddr(target)
    host = addr.value_for_protocol("ip4")
    port = int(addr.value_for_protocol("tcp"))
    for _ in range(max_opens):
        if stop.is_set():
            return
        try:
            with trio.move_on_after(STEP_TIMEOUT_S):
                stream = await trio.open_tcp_stream(host, port, local_address=source_ip)
        except OSError:
            stream = None
        if stream is not None:
            async with stream:
                async with trio.open_nursery() as nursery:

                    async def stop_holding() -> None:
                        await stop.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(stop_holding)
                    try:
                        while await stream.receive_some(1024):
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    if not stop.is_set():
                        cuts[0] += 1
                    nursery.cancel_scope.cancel()
        await trio.sleep(reopen_after)


async def open_throwaway_noise_from(target: str, source_ip: str, stack: AsyncExitStack) -> str:
    """:func:`open_throwaway_noise` from ``source_ip`` (a raw TCP socket bound there)."""
    peer_id, addr = split_peer_multiaddr(target)
    host = addr.value_for_protocol("ip4")
    port = int(addr.value_for_protocol("tcp"))
    key_pair = create_new_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    upgrader = TransportUpgrader(
        {TProtocol(NOISE_PROTOCOL_ID): noise}, {TProtocol(YAMUX_PROTOCOL_ID): Yamux}
    )
    with trio.move_on_after(STEP_TIMEOUT_S):
        try:
            stream = await trio.open_tcp_stream(host, port, local_address=source_ip)
        except OSError:
            return UNREACHED
        raw = RawConnection(TrioTCPStream(stream), True)
        stack.push_async_callback(_close, raw)
        try:
            secured = await upgrader.upgrade_security(raw, True, ID.from_base58(peer_id))
            await upgrader.upgrade_connection(secured, ID.from_base58(peer_id))
        except Exception:
            return CUT
        return UPGRADED
    return UNREACHED


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
