"""Who may use a relay, and for how much (issue 20 parts 2 and 3), on real libp2p hosts.

Every host runs on 127.0.0.1; attackers speak the relay's HOP protocol directly
(libp2p's own message types), as a hostile client would. Each test is bounded by
trio.fail_after; assertions count bytes, replies and refusals, never seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from gossip.keys import NodeKey
from p2pfl.ratelimit import PeerRateLimiter
from p2pfl.relay import (
    RELAY_MAX_RESERVATIONS_PER_IP,
    RELAY_MAX_STRANGER_CIRCUITS,
    STRANGER_CIRCUIT_MAX_BYTES,
    RelayPolicy,
)
from p2pfl.status import render_metrics
from p2pfl.transport import Transport, TransportError

pytestmark = pytest.mark.integration

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SINK = TProtocol("/p2pfl/test/sink/1.0.0")
DEADLINE_S = 30.0
MIB = 1 << 20
FORGED_RESERVES = 80  # more than the 64-slot table they used to fill


@asynccontextmanager
async def nodes(
    count: int,
    *,
    allow: bool = False,
    relay_limiter: PeerRateLimiter | None = None,
) -> AsyncIterator[list[Transport]]:
    """``count`` hosts; the first serves relays (with ``allow``, all of them are the
    allowlist), the others only dial and accept relayed connections."""
    keys = [NodeKey.generate() for _ in range(count)]
    allowed = frozenset(key.peer_id for key in keys) if allow else None
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                Transport.open(
                    key, [LOOPBACK], relay=index == 0, allowed_peers=allowed,
                    rate_limiter=relay_limiter if index == 0 else None,
                )
            )
            for index, key in enumerate(keys)
        ]  # fmt: skip


def policy(relay: Transport) -> RelayPolicy:
    assert relay.nat is not None
    return relay.nat.policy


def members_are(relay: Transport, *peers: Transport) -> None:
    """As the runtime does on an open node: the relay gossips with ``peers``."""
    ids = frozenset(peer.peer_id for peer in peers)
    members: Callable[[], Collection[str]] = lambda: ids  # noqa: E731
    policy(relay).members = members


async def reserve(relay: Transport, client: Transport) -> str:
    await client.connect(relay.addrs[0], 5.0)
    assert client.nat is not None
    return (await client.nat.reserve(relay.addrs[0])).circuit_addr


class Sink:
    """Counts the bytes of every stream on SINK at one host."""

    def __init__(self, host: Transport) -> None:
        self.received = 0
        host.host.set_stream_handler(SINK, self._drain)

    async def _drain(self, stream: INetStream) -> None:
        try:
            while data := await stream.read(1 << 16):
                self.received += len(data)
        except Exception:  # reset or EOF: the circuit ended
            pass


async def push(sender: Transport, receiver: Transport, nbytes: int) -> int:
    """Write up to ``nbytes`` to ``receiver``'s sink; the bytes written before a failure."""
    written = 0
    try:
        stream = await sender.host.new_stream(ID.from_base58(receiver.peer_id), [SINK])
        chunk = b"x" * (1 << 16)
        with trio.move_on_after(10.0):  # a cut circuit may leave a write waiting: bounded
            while written < nbytes:
                await stream.write(chunk)
                written += len(chunk)
            await stream.close()
    except Exception:
        pass
    return written


async def settle(condition: Callable[[], bool], steps: int = 500) -> None:
    """Wait (bounded, by steps) until ``condition`` holds."""
    for _ in range(steps):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition never held")


async def hop_stream(client: Transport, relay: Transport) -> INetStream:
    await client.connect(relay.addrs[0], 5.0)
    return await client.host.new_stream(ID.from_base58(relay.peer_id), [HOP])


async def hop_request(stream: INetStream, kind: int, peer_id: str) -> int:
    message = HopMessage(type=kind, peer=CircuitPeerId(id=ID.from_base58(peer_id).to_bytes()))
    await write_delimited_msg(stream, message)
    reply = await read_delimited_msg(stream, HopMessage)
    return int(reply.status)


# -- part 3: the reservation table ------------------------------------------------------


async def test_forged_reserve_requests_store_nothing_and_a_member_still_reserves() -> None:
    with trio.fail_after(DEADLINE_S):
        async with nodes(3) as (relay, attacker, member):
            stream = await hop_stream(attacker, relay)
            replies = [
                await hop_request(stream, HopMessage.RESERVE, NodeKey.generate().peer_id)
                for _ in range(FORGED_RESERVES)
            ]
            assert replies == [StatusCode.PERMISSION_DENIED] * FORGED_RESERVES
            assert relay.nat is not None
            # libp2p's own table, not our pruned view: nothing was stored at all.
            assert relay.nat.protocol.resource_manager._reservations == {}
            await reserve(relay, member)
            assert relay.nat.protocol.held_reservations() == {member.peer_id: "127.0.0.1"}
            # The attacker may still reserve for itself, once: one peer, one entry.
            own = attacker.peer_id
            renewals = [await hop_request(stream, HopMessage.RESERVE, own) for _ in range(3)]
            assert renewals == [StatusCode.OK] * 3
            assert set(relay.nat.protocol.held_reservations()) == {member.peer_id, attacker.peer_id}
            assert policy(relay).refused["reserve-forged-peer"] == FORGED_RESERVES


async def test_strangers_of_one_ip_take_few_slots_and_a_gone_peer_frees_its_own() -> None:
    strangers = RELAY_MAX_RESERVATIONS_PER_IP + 1
    with trio.fail_after(DEADLINE_S):
        async with nodes(strangers + 2) as (relay, member, *others):
            members_are(relay, member)
            outcomes = []
            for stranger in others:
                try:
                    await reserve(relay, stranger)
                    outcomes.append(True)
                except ConnectionError:
                    outcomes.append(False)
            assert outcomes == [True] * RELAY_MAX_RESERVATIONS_PER_IP + [False]
            assert policy(relay).refused["reservations-per-ip"] == 1
            await reserve(relay, member)  # a member is not held to the strangers' share
            assert relay.nat is not None
            assert member.peer_id in relay.nat.protocol.held_reservations()
            # A stranger that left holds nothing: the last one gets its slot.
            await relay.disconnect(others[0].peer_id)
            await settle(lambda: others[0].peer_id not in relay.connected_peers())
            await reserve(relay, others[-1])


# -- part 2: what a relay carries, for whom ---------------------------------------------


async def test_strangers_move_at_most_the_stranger_limit_through_an_open_node() -> None:
    with trio.fail_after(DEADLINE_S):
        async with nodes(3) as (relay, dialer, natted):
            sink = Sink(natted)
            addr = await reserve(relay, natted)
            await dialer.connect(addr, 5.0)
            written = await push(dialer, natted, MIB)
            await settle(lambda: policy(relay).circuits == [])
            relayed = policy(relay).bytes_relayed
            print(f"stranger circuit: wrote {written}, relayed {relayed}, "
                  f"delivered {sink.received} payload bytes")  # fmt: skip
            assert relayed == STRANGER_CIRCUIT_MAX_BYTES  # to the byte, then cut
            assert sink.received < STRANGER_CIRCUIT_MAX_BYTES
            assert policy(relay).cut["circuit-bytes"] == 1
            view = policy(relay).view()
            assert view["cut"] == {"circuit-bytes": 1} and view["circuits_open"] == 0


async def test_a_stranger_circuit_is_cut_at_its_time_limit() -> None:
    with trio.fail_after(DEADLINE_S):
        async with nodes(3) as (relay, dialer, natted):
            policy(relay).bounds = replace(policy(relay).bounds, stranger_circuit_seconds=1.0)
            await dialer.connect(await reserve(relay, natted), 5.0)
            assert len(policy(relay).circuits) == 1
            await settle(lambda: policy(relay).circuits == [], steps=2000)
            assert policy(relay).cut == {"circuit-seconds": 1}


async def test_members_relay_model_sized_payloads_charged_to_both_budgets() -> None:
    budget = PeerRateLimiter(1.0, 64 * MIB)  # 1 byte/s refill: what is spent stays spent
    with trio.fail_after(DEADLINE_S):
        async with nodes(3, allow=True, relay_limiter=budget) as (relay, dialer, natted):
            sink = Sink(natted)
            addr = await reserve(relay, natted)
            await dialer.connect(addr, 5.0)
            assert await push(dialer, natted, 2 * MIB) == 2 * MIB
            await settle(lambda: sink.received == 2 * MIB)
            now = trio.current_time()
            for peer in (dialer, natted):
                spent = budget.burst - budget.available(peer.peer_id, now)
                assert spent >= 2 * MIB
            assert policy(relay).bytes_relayed >= 2 * MIB
            assert policy(relay).refused == {} and policy(relay).cut == {}


async def test_a_relay_cuts_a_circuit_whose_ends_ran_out_of_budget() -> None:
    budget = PeerRateLimiter(1.0, 256 * 1024)
    with trio.fail_after(DEADLINE_S):
        async with nodes(3, allow=True, relay_limiter=budget) as (relay, dialer, natted):
            sink = Sink(natted)
            addr = await reserve(relay, natted)
            await dialer.connect(addr, 5.0)
            await push(dialer, natted, 2 * MIB)
            await settle(lambda: policy(relay).circuits == [])
            assert policy(relay).cut["rate-limited"] == 1
            assert policy(relay).bytes_relayed == 256 * 1024  # to the byte, then cut
            assert sink.received < 256 * 1024


async def test_with_an_allowlist_no_byte_moves_between_non_members() -> None:
    outsider_key = NodeKey.generate()
    with trio.fail_after(DEADLINE_S):
        async with (
            nodes(2, allow=True) as (relay, natted),
            Transport.open(outsider_key, [LOOPBACK], relay=False) as outsider,
        ):
            sink = Sink(natted)
            addr = await reserve(relay, natted)
            with pytest.raises(TransportError):
                await outsider.connect(addr, 5.0)
            await push(outsider, natted, MIB)
            assert sink.received == 0
            assert policy(relay).bytes_relayed == 0 and policy(relay).circuits_opened == 0
            # The relay's own rule, should a non-member's connection get that far.
            outsider_id = outsider.peer_id
            assert policy(relay).open_circuit(outsider_id, natted.peer_id, 0.0) == "not-member"
            assert policy(relay).reservation_refusal(outsider_id, None, {}) == "not-member"
            assert policy(relay).refused["not-member"] == 2


async def held_circuits(relay: Transport, dialer: Transport, natted: Transport, attempts: int
                        ) -> tuple[list[int], int]:  # fmt: skip
    """``attempts`` raw CONNECTs from ``dialer`` to ``natted``, each kept open: the
    replies, and the most circuits the relay held at once."""
    streams, replies, peak = [], [], 0
    for _ in range(attempts):
        stream = await hop_stream(dialer, relay)
        streams.append(stream)
        replies.append(await hop_request(stream, HopMessage.CONNECT, natted.peer_id))
        peak = max(peak, len(policy(relay).circuits))
    for stream in streams:
        await stream.reset()
    return replies, peak


async def test_stranger_circuits_are_capped_per_relay_not_per_reservation() -> None:
    attempts = RELAY_MAX_STRANGER_CIRCUITS + 8
    with trio.fail_after(DEADLINE_S):
        async with nodes(3) as (relay, dialer, natted):
            await reserve(relay, natted)
            replies, peak = await held_circuits(relay, dialer, natted, attempts)
            assert peak <= RELAY_MAX_STRANGER_CIRCUITS
            refused = replies.count(StatusCode.RESOURCE_LIMIT_EXCEEDED)
            assert refused >= 1 and refused + replies.count(StatusCode.OK) == attempts
            assert policy(relay).refused["stranger-circuits-full"] == refused
            text = render_metrics({**SAMPLE_STATUS, "relay": policy(relay).view()})
            assert f'p2pfl_relay_refused_total{{reason="stranger-circuits-full"}} {refused}' in text


async def test_member_circuits_are_capped_in_all() -> None:
    with trio.fail_after(DEADLINE_S):
        async with nodes(3) as (relay, dialer, natted):
            members_are(relay, dialer, natted)
            policy(relay).bounds = replace(policy(relay).bounds, max_circuits=4)
            await reserve(relay, natted)
            replies, peak = await held_circuits(relay, dialer, natted, 7)
            assert peak <= 4
            assert replies.count(StatusCode.RESOURCE_LIMIT_EXCEEDED) >= 1
            assert policy(relay).refused["circuits-full"] >= 1


async def test_a_connect_to_a_peer_without_a_reservation_is_refused_and_counted() -> None:
    with trio.fail_after(DEADLINE_S):
        async with nodes(3) as (relay, dialer, other):
            await other.connect(relay.addrs[0], 5.0)
            stream = await hop_stream(dialer, relay)
            assert await hop_request(stream, HopMessage.CONNECT, other.peer_id) == (
                StatusCode.NO_RESERVATION
            )
            assert policy(relay).refused["no-reservation"] == 1


SAMPLE_STATUS = {
    "round": 0, "neighbours": [], "updates_sent": 0, "updates_accepted": 0,
    "updates_rejected": {}, "bytes_sent": 0, "bytes_received": 0, "uptime_s": 1.0,
}  # fmt: skip
