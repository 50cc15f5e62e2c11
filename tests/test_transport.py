"""The transport and peer exchange over real libp2p hosts on 127.0.0.1 (no mocks).

Each test is bounded by trio.fail_after; inbound limits use short read timeouts so
the whole file stays within a few seconds.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import msgpack
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr
from runtimes import wait_until

from gossip.keys import NodeKey
from p2pfl.framing import encode_uvarint
from p2pfl.host import new_node_host, parse_multiaddr, split_peer_multiaddr
from p2pfl.linkrates import LinkRates
from p2pfl.peer_exchange import (
    FORGET_UNREACHABLE_AFTER_S,
    MAX_PEERS_PER_REPLY,
    PEERS_PROTOCOL,
    PeerBook,
    decode_reply,
    decode_request,
    discovery_round,
    exchange_peers,
    serve_peer_exchange,
)
from p2pfl.transport import Transport, TransportError, Unanswered

pytestmark = pytest.mark.integration

PROTOCOL = "/p2pfl/test/1.0.0"
OTHER_PROTOCOL = "/p2pfl/test-other/1.0.0"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@asynccontextmanager
async def transports(count: int, **options: int) -> AsyncIterator[list[Transport]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                Transport.open(NodeKey.generate(), [LOOPBACK], **options)
            )
            for _ in range(count)
        ]


def collect_into(received: list[tuple[str, bytes]], reply: bytes | None = None):
    async def handler(peer_id: str, payload: bytes) -> bytes | None:
        received.append((peer_id, payload))
        return reply

    return handler


async def raw_stream(sender: Transport, receiver: Transport):
    """A bare libp2p stream to the receiver's test protocol, for hand-made frames."""
    await sender.connect(receiver.addrs[0], timeout=5)
    return await sender.host.new_stream(ID.from_base58(receiver.peer_id), [TProtocol(PROTOCOL)])


# -- host ---------------------------------------------------------------------------------


def test_host_identity_is_the_node_key() -> None:
    key = NodeKey.generate()
    assert str(new_node_host(key).get_id()) == key.peer_id


@pytest.mark.parametrize(
    "text", ["", "not-a-multiaddr", "/ip4/999.1.1.1/tcp/1", "/ip4/1.2.3.4/tcp"]
)
def test_bad_multiaddr_is_one_line_value_error(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_multiaddr(text)
    assert "\n" not in str(caught.value)


def test_peer_multiaddr_needs_p2p_suffix() -> None:
    with pytest.raises(ValueError, match="/p2p/"):
        split_peer_multiaddr("/ip4/127.0.0.1/tcp/4001")


async def test_addrs_carry_the_bound_port_and_peer_id() -> None:
    with trio.fail_after(10):
        async with transports(1) as [node]:
            (addr,) = node.addrs
            assert addr.endswith(f"/p2p/{node.peer_id}")
            assert int(parse_multiaddr(addr).value_for_protocol("tcp")) > 0


async def test_cancelled_transport_still_closes_its_host() -> None:
    with trio.fail_after(10):
        with trio.move_on_after(0.5):
            async with Transport.open(NodeKey.generate(), [LOOPBACK]) as node:
                addr = node.addrs[0]
                await trio.sleep_forever()
        async with transports(1) as [probe]:
            with pytest.raises(TransportError, match="cannot connect"):
                await probe.connect(addr, timeout=5)


# -- payloads -----------------------------------------------------------------------------


async def test_send_delivers_1_kib_and_8_mib_intact() -> None:
    with trio.fail_after(15):
        async with transports(2) as [a, b]:
            received: list[tuple[str, bytes]] = []
            b.set_handler(PROTOCOL, collect_into(received), max_size=16 << 20, read_timeout=10)
            peer = await a.connect(b.addrs[0], timeout=5)
            small, large = os.urandom(1024), os.urandom(8 << 20)
            await a.send(peer, PROTOCOL, small, timeout=5)
            await a.send(peer, PROTOCOL, large, timeout=10)
            await wait_until(lambda: len(received) == 2)
            assert received == [(a.peer_id, small), (a.peer_id, large)]
            assert b.bytes_received == a.bytes_sent > len(small) + len(large)


async def test_served_frames_measure_the_peers_link() -> None:
    """A frame that missed its deadline halves the sender's rate; a large one that
    completes at loopback speed raises it again (the promise, 16 Mbit/s, is far below)."""
    with trio.fail_after(30):
        async with transports(2) as [a, b]:
            received: list[tuple[str, bytes]] = []
            rates = LinkRates(assumed=2e6)
            b.set_handler(PROTOCOL, collect_into(received), 16 << 20, 0.5, rates)
            peer = await a.connect(b.addrs[0], timeout=5)
            stream = await a.host.new_stream(ID.from_base58(peer), [TProtocol(PROTOCOL)])
            await stream.write(encode_uvarint(1 << 20) + b"x")  # then nothing more
            await wait_until(lambda: b.frame_errors["timeout"] == 1)
            assert rates.rate(a.peer_id) == 1e6
            await a.send(peer, PROTOCOL, os.urandom(4 << 20), timeout=20)
            await wait_until(lambda: len(received) == 1)
            assert rates.rate(a.peer_id) > 1e6


async def test_only_a_missed_deadline_counts_as_timed_out() -> None:
    """What makes the daemon halve that peer's rate; a handler's reset does not."""
    with trio.fail_after(30):
        async with transports(2) as [a, b]:

            async def never_answers(peer_id: str, payload: bytes) -> bytes:
                await trio.sleep_forever()
                raise AssertionError

            async def fails(peer_id: str, payload: bytes) -> bytes:
                raise RuntimeError("handler failed")

            b.set_handler(PROTOCOL, never_answers, 1024, 10)
            b.set_handler(OTHER_PROTOCOL, fails, 1024, 10)
            peer = await a.connect(b.addrs[0], timeout=5)
            with pytest.raises(Unanswered) as caught:
                await a.request(peer, PROTOCOL, b"x", 2.0, 64)
            assert caught.value.timed_out
            with pytest.raises(Unanswered) as caught:
                await a.request(peer, OTHER_PROTOCOL, b"x", 10.0, 64)
            assert not caught.value.timed_out


@pytest.mark.slow
async def test_send_delivers_64_mib_intact() -> None:
    with trio.fail_after(60):
        async with transports(2) as [a, b]:
            received: list[tuple[str, bytes]] = []
            b.set_handler(PROTOCOL, collect_into(received), max_size=64 << 20, read_timeout=30)
            peer = await a.connect(b.addrs[0], timeout=5)
            payload = os.urandom(64 << 20)
            await a.send(peer, PROTOCOL, payload, timeout=30)
            await wait_until(lambda: len(received) == 1)
            assert received[0][1] == payload


async def test_request_returns_the_reply_frame() -> None:
    with trio.fail_after(10):
        async with transports(2) as [a, b]:

            async def echo_upper(peer_id: str, payload: bytes) -> bytes:
                return peer_id.encode() + b":" + payload.upper()

            b.set_handler(PROTOCOL, echo_upper, max_size=1024, read_timeout=5)
            peer = await a.connect(b.addrs[0], timeout=5)
            reply = await a.request(peer, PROTOCOL, b"ping", timeout=5, max_size=1024)
            assert reply == a.peer_id.encode() + b":PING"
            assert a.peer_id in b.connected_peers()
            assert b.peer_addrs(a.peer_id)  # learnt through identify or the connection


async def test_request_without_reply_is_a_transport_error() -> None:
    with trio.fail_after(10):
        async with transports(2) as [a, b]:
            b.set_handler(PROTOCOL, collect_into([]), max_size=1024, read_timeout=5)
            peer = await a.connect(b.addrs[0], timeout=5)
            with pytest.raises(TransportError, match="truncated"):
                await a.request(peer, PROTOCOL, b"ping", timeout=5, max_size=1024)


async def test_handler_exception_is_counted_and_the_node_keeps_serving() -> None:
    with trio.fail_after(10):
        async with transports(2) as [a, b]:
            calls = []

            async def flaky(peer_id: str, payload: bytes) -> bytes:
                calls.append(payload)
                if payload == b"boom":
                    raise RuntimeError("handler bug")
                return b"fine"

            b.set_handler(PROTOCOL, flaky, max_size=1024, read_timeout=5)
            peer = await a.connect(b.addrs[0], timeout=5)
            with pytest.raises(TransportError):
                await a.request(peer, PROTOCOL, b"boom", timeout=5, max_size=1024)
            assert await a.request(peer, PROTOCOL, b"ok", timeout=5, max_size=1024) == b"fine"
            assert b.stream_errors["handler"] == 1


# -- inbound limits -----------------------------------------------------------------------


async def test_oversize_prefix_is_rejected_before_the_body() -> None:
    with trio.fail_after(10):
        async with transports(2) as [a, b]:
            received: list[tuple[str, bytes]] = []
            # A read timeout far beyond the test's guard: only rejecting on the prefix alone
            # ends this, and the stream is never counted as a timeout.
            b.set_handler(PROTOCOL, collect_into(received), max_size=1000, read_timeout=3600)
            stream = await raw_stream(a, b)
            await stream.write(encode_uvarint(1001))  # no body follows
            await wait_until(lambda: b.frame_errors["oversize"] == 1)
            assert received == []
            assert b.frame_errors == {"oversize": 1}


async def test_truncated_frame_is_counted() -> None:
    with trio.fail_after(10):
        async with transports(2) as [a, b]:
            b.set_handler(PROTOCOL, collect_into([]), max_size=1000, read_timeout=0.5)
            stream = await raw_stream(a, b)
            await stream.write(encode_uvarint(100) + b"x" * 40)
            await stream.close()
            await wait_until(lambda: b.frame_errors["truncated"] == 1)


async def test_silent_and_trickling_peers_time_out() -> None:
    with trio.fail_after(10):
        async with transports(2) as [a, b]:
            b.set_handler(PROTOCOL, collect_into([]), max_size=1000, read_timeout=0.5)
            await raw_stream(a, b)  # opened, never written to
            trickling = await raw_stream(a, b)
            await trickling.write(encode_uvarint(1000))
            reset = False
            # A byte every 0.1 s is steady progress for longer than the test's guard: only
            # a deadline on the whole frame resets the stream before the frame is complete.
            for _ in range(999):
                await trio.sleep(0.1)
                try:
                    await trickling.write(b"x")
                except Exception:
                    reset = True  # reset by the receiver: that is the point
                    break
            assert reset
            await wait_until(lambda: b.frame_errors["timeout"] == 2)


async def test_streams_over_the_per_peer_cap_are_reset_as_busy() -> None:
    with trio.fail_after(10):
        async with transports(2, max_inbound_streams_per_peer=2) as [a, b]:
            b.set_handler(PROTOCOL, collect_into([]), max_size=1000, read_timeout=2)
            await raw_stream(a, b)
            await raw_stream(a, b)
            # The third is reset as soon as it is negotiated, which the opener may or may
            # not see before its own negotiation finishes.
            try:
                await raw_stream(a, b)
            except StreamFailure:
                pass
            await wait_until(lambda: b.stream_errors["busy"] == 1)
            assert b.frame_errors == {}


# -- security and failures ----------------------------------------------------------------


async def test_plaintext_dialer_cannot_reach_a_noise_only_node() -> None:
    with trio.fail_after(15):
        async with transports(1) as [node]:
            received: list[tuple[str, bytes]] = []
            node.set_handler(PROTOCOL, collect_into(received), max_size=1024, read_timeout=1)
            key_pair = create_new_key_pair()
            plain = new_host(
                key_pair=key_pair,
                sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
            )
            async with plain.run([Multiaddr(LOOPBACK)]):
                try:
                    info = info_from_p2p_addr(Multiaddr(node.addrs[0]))
                    with pytest.raises(Exception):  # noqa: B017  (any refusal will do)
                        with trio.fail_after(10):
                            await plain.connect(info)
                            stream = await plain.new_stream(info.peer_id, [TProtocol(PROTOCOL)])
                            await stream.write(encode_uvarint(2) + b"hi")
                    assert received == []
                    assert node.connected_peers() == []
                finally:
                    await plain.close()


async def test_send_to_a_dead_peer_fails_within_its_timeout() -> None:
    with trio.fail_after(15):
        async with transports(1) as [a]:
            async with transports(1) as [b]:
                peer = await a.connect(b.addrs[0], timeout=5)
            # b is gone; a may or may not have noticed the connection closing yet. Either way
            # the send ends in a one-line TransportError: the test's guard is 5x its timeout,
            # so only a send that ignored its timeout altogether fails it.
            with pytest.raises(TransportError) as caught:
                await a.send(peer, PROTOCOL, b"hello", timeout=3)
            assert "\n" not in str(caught.value)


async def test_restarted_peer_is_reachable_again_at_its_new_address() -> None:
    with trio.fail_after(15):
        key = NodeKey.generate()
        async with transports(1) as [a]:
            async with Transport.open(key, [LOOPBACK]) as b:
                await a.connect(b.addrs[0], timeout=5)
            with pytest.raises(TransportError):
                await a.send(key.peer_id, PROTOCOL, b"lost", timeout=3)
            async with Transport.open(key, [LOOPBACK]) as b_again:
                received: list[tuple[str, bytes]] = []
                b_again.set_handler(PROTOCOL, collect_into(received), max_size=64, read_timeout=2)
                assert await a.connect(b_again.addrs[0], timeout=5) == key.peer_id
                await a.send(key.peer_id, PROTOCOL, b"back", timeout=3)
                await wait_until(lambda: received == [(a.peer_id, b"back")])


async def test_send_to_an_unknown_peer_fails_within_its_timeout() -> None:
    with trio.fail_after(10):
        async with transports(1) as [a]:
            stranger = NodeKey.generate().peer_id
            # A timeout beyond the test's guard: a peer with no address fails at once, on
            # its own, not by waiting out the timeout.
            with pytest.raises(TransportError):
                await a.send(stranger, PROTOCOL, b"hello", timeout=3600)


# -- peer exchange ------------------------------------------------------------------------


async def test_four_nodes_bootstrapping_from_node_0_learn_each_other() -> None:
    with trio.fail_after(15):
        async with transports(4) as nodes:
            books = [PeerBook(node.peer_id) for node in nodes]
            for node, book in zip(nodes, books, strict=True):
                serve_peer_exchange(node, book, read_timeout=2)
            bootstrap = nodes[0].addrs[0]
            for node, book in zip(nodes[1:], books[1:], strict=True):
                await node.connect(bootstrap, timeout=5)
                await exchange_peers(node, nodes[0].peer_id, book, timeout=5)
            # Node 0 now knows everyone; a discovery round spreads that to the others.
            for node, book in zip(nodes[1:], books[1:], strict=True):
                await discovery_round(node, book, fanout=3, timeout=5)
            everyone = {node.peer_id for node in nodes}
            for node, book in zip(nodes, books, strict=True):
                assert set(book.known()) == everyone - {node.peer_id}
            # What was learnt is each peer's real listen address, not a guess.
            for book in books:
                for node in nodes:
                    if node.peer_id in book:
                        assert book.addrs(node.peer_id) == node.addrs


async def test_malformed_peer_exchange_request_is_counted_not_fatal() -> None:
    with trio.fail_after(10):
        async with transports(2) as [a, b]:
            book = PeerBook(b.peer_id)
            serve_peer_exchange(b, book, read_timeout=2)
            peer = await a.connect(b.addrs[0], timeout=5)
            for garbage in [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"addrs": [1]})]:
                with pytest.raises(TransportError):
                    await a.request(peer, PEERS_PROTOCOL, garbage, timeout=5, max_size=1 << 20)
            assert book.rejected["malformed-request"] == 3
            assert await exchange_peers(a, peer, PeerBook(a.peer_id), timeout=5) == 0


def test_decode_request_keeps_only_the_requesters_own_addresses() -> None:
    requester, other = NodeKey.generate().peer_id, NodeKey.generate().peer_id
    own = f"/ip4/10.0.0.1/tcp/4001/p2p/{requester}"
    planted = f"/ip4/10.0.0.2/tcp/4001/p2p/{other}"
    wildcard = f"/ip4/0.0.0.0/tcp/4001/p2p/{requester}"
    request = msgpack.packb({"addrs": [own, planted, wildcard]})
    assert decode_request(request, requester) == [own]


@pytest.mark.parametrize(
    "reply",
    [
        b"",
        b"\xc1",
        msgpack.packb({"peers": "x"}),
        msgpack.packb({"peers": [], "extra": 1}),
        msgpack.packb({"peers": [[1, 2]] * (MAX_PEERS_PER_REPLY + 1)}),
        msgpack.packb({"peers": []}) + b"\x00",
        msgpack.packb({"peers": [msgpack.ExtType(1, b"x")]}),
    ],
)
def test_decode_reply_rejects_malformed_input(reply: bytes) -> None:
    assert decode_reply(reply) is None


def test_decode_reply_drops_bad_entries_and_keeps_good_ones() -> None:
    good = NodeKey.generate().peer_id
    entries = [
        [good, [f"/ip4/10.0.0.1/tcp/1/p2p/{good}"]],
        ["not-a-peer-id", ["/ip4/10.0.0.1/tcp/1"]],
        [good],
    ]
    assert decode_reply(msgpack.packb({"peers": entries})) == (
        [(good, [f"/ip4/10.0.0.1/tcp/1/p2p/{good}"])],
        2,
    )


def test_second_hand_addresses_never_displace_first_hand_ones() -> None:
    peer = NodeKey.generate().peer_id
    book = PeerBook(NodeKey.generate().peer_id)
    real = f"/ip4/10.0.0.1/tcp/1/p2p/{peer}"
    assert book.add(peer, [real], observed_ip="10.0.0.1") is True
    forged = [f"/ip4/10.6.6.{i}/tcp/1/p2p/{peer}" for i in range(20)]
    assert book.add(peer, forged, first_hand=False, source="liar") is False
    assert book.addrs(peer) == [real]


def test_peer_book_keeps_an_unreachable_peer_until_it_has_been_gone_a_while() -> None:
    now = [0.0]
    peer = NodeKey.generate().peer_id
    book = PeerBook(NodeKey.generate().peer_id, clock=lambda: now[0])
    book.add(peer, [f"/ip4/10.0.0.1/tcp/1/p2p/{peer}"], observed_ip="10.0.0.1")
    # A partition's worth of failures: unreachable, not chosen, but still known.
    assert [book.mark_failed(peer) for _ in range(5)] == [False] * 5
    assert peer in book.known() and not book.reachable(peer)
    # It answers again: reachable, and the count starts over.
    book.mark_alive(peer)
    assert book.reachable(peer)
    # Gone for good: failures spread over FORGET_UNREACHABLE_AFTER_S forget it.
    assert book.mark_failed(peer) is False
    now[0] += FORGET_UNREACHABLE_AFTER_S
    assert book.mark_failed(peer) is False  # only 2 in a row so far
    assert book.mark_failed(peer) is True
    assert peer not in book and book.sample(5) == []


async def test_dial_any_skips_unparsable_addresses_and_reaches_the_peer() -> None:
    with trio.fail_after(30):
        async with transports(2) as [a, b]:
            await a.dial_any(b.peer_id, ["not a multiaddr", b.addrs[0]], 5.0)
            assert b.peer_id in a.connected_peers()


async def test_dial_any_names_the_last_failure_or_that_none_was_dialable() -> None:
    with trio.fail_after(30):
        async with transports(1) as [a]:
            peer = NodeKey.generate().peer_id
            with pytest.raises(TransportError, match="no dialable address known"):
                await a.dial_any(peer, ["not a multiaddr"], 1.0)
            with pytest.raises(TransportError, match="cannot connect"):
                await a.dial_any(peer, [f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"], 2.0)
