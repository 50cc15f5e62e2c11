"""Inbound streams: one handler per protocol, behind the stream gates.

Inbound streams pass three gates before any byte is read: the peer must be allowed
(``allowed_peers``, when set), must have byte budget left (``rate_limiter``), and must
hold fewer than the per-peer and global stream caps. A stream that fails a gate is
reset; body bytes are charged to the peer's budget as they are read. Failures are
counted by reason and never reach libp2p, which would otherwise log them with the
payload. A route is one frame and its reply, or the two-step offer exchange
(``screen``: an offer, its answer, then the body; the peer's ``Transport.offer``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from p2pfl.framing import FrameError, read_frame, write_frame
from p2pfl.gating import ConnectionGate, Members
from p2pfl.linkrates import LinkRates
from p2pfl.member_source import MemberSource
from p2pfl.ratelimit import PeerRateLimiter
from p2pfl.streams import Traffic, close_quietly, describe, frame_size, reset_quietly

logger = logging.getLogger(__name__)

DEFAULT_MAX_INBOUND_STREAMS_PER_PEER = 8
# Across all peers, so many cheap identities cannot add up to unbounded buffers either.
DEFAULT_MAX_INBOUND_STREAMS = 64

Handler = Callable[[str, bytes], Awaitable[bytes | None]]
"""An inbound handler: ``(peer_id, payload) -> reply`` (None = no reply)."""

# Judges the first frame of a two-step exchange: the reply to write, and how many bytes
# the second frame must hold (None: refused, the exchange ends with that reply).
Screen = Callable[[str, bytes], Awaitable[tuple[bytes, int | None]]]


class _RateLimited(Exception):
    """A peer's byte budget ran out while we were reading its frame."""


class _MeteredStream:
    """Reads from ``stream``, charging every byte to the remote peer's budget.

    Each read reserves what it asks for before waiting and refunds what did not
    arrive, so concurrent streams of one peer cannot together overdraw its budget.
    """

    def __init__(self, stream: INetStream, limiter: PeerRateLimiter, peer_id: str) -> None:
        self._stream = stream
        self._limiter = limiter
        self._peer_id = peer_id

    async def read(self, n: int | None = None) -> bytes:
        if n is None:
            raise ValueError("a metered read needs a size")
        if not self._limiter.allows(self._peer_id, n, trio.current_time()):
            raise _RateLimited(f"{self._peer_id} is over its byte budget")
        self._limiter.charge(self._peer_id, n, trio.current_time())
        got = 0
        try:
            data = await self._stream.read(n)
            got = len(data)
            return data
        finally:
            self._limiter.charge(self._peer_id, got - n, trio.current_time())


@dataclass(frozen=True)
class _Route:
    handler: Handler
    max_size: int
    read_timeout: float
    # A frame's deadline grows by its size at the peer's link rate (None: fixed).
    rates: LinkRates | None = None
    # Two steps (an offer, then its body), or None for one frame and its reply.
    screen: Screen | None = None
    max_offer_size: int = 0


class InboundRouter:
    """The protocols one host serves, and the gates every inbound stream passes.

    ``disconnect(peer_id)`` drops a peer whose stream was refused (not a member)."""

    def __init__(
        self,
        host: IHost,
        nursery: trio.Nursery,
        traffic: Traffic,
        disconnect: Callable[[str], Awaitable[None]],
        *,
        max_inbound_streams_per_peer: int = DEFAULT_MAX_INBOUND_STREAMS_PER_PEER,
        max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS,
        allowed_peers: Members | None = None,
        rate_limiter: PeerRateLimiter | None = None,
        gate: ConnectionGate | None = None,
    ) -> None:
        self._host = host
        self._nursery = nursery
        self._traffic = traffic
        self._disconnect = disconnect
        self._gate = gate
        self.max_inbound_streams_per_peer = max_inbound_streams_per_peer
        self.max_inbound_streams = max_inbound_streams
        self.allowed_peers = allowed_peers
        self.open_protocols: frozenset[str] = frozenset()
        """Protocols a non-member may use where ``allowed_peers`` lets strangers in
        (a network: the members protocol, to show a certificate)."""
        """Peer ids whose inbound streams are served; None serves everyone."""
        self.rate_limiter = rate_limiter
        """Per-peer byte budget of inbound frames and of replies; None: unlimited."""
        self.frame_errors: Counter[str] = Counter()
        """Inbound frames that failed, by FrameError reason."""
        self.stream_errors: Counter[str] = Counter()
        """Inbound streams dropped for other reasons: busy, rate-limited, handler, reply,
        internal."""
        self.streams_refused: Counter[str] = Counter()
        """Inbound streams from peers not in ``allowed_peers``, by protocol."""
        self._open: Counter[str] = Counter()

    def open_streams(self, peer_id: str) -> int:
        """Inbound streams of ``peer_id`` being served now (its per-peer cap's count)."""
        return self._open[peer_id]

    def set_handler(
        self,
        protocol: str,
        handler: Handler,
        max_size: int,
        read_timeout: float,
        rates: LinkRates | None = None,
        screen: Screen | None = None,
        max_offer_size: int = 0,
    ) -> None:
        """Serve ``protocol``; see ``Transport.set_handler``."""
        if max_size < 0 or not math.isfinite(read_timeout) or read_timeout <= 0:
            raise ValueError("set_handler needs max_size >= 0 and a finite read_timeout > 0")
        route = _Route(handler, max_size, read_timeout, rates, screen, max_offer_size)

        async def on_stream(stream: INetStream) -> None:
            await self._serve(stream, protocol, route)

        self._host.set_stream_handler(TProtocol(protocol), on_stream)

    def remove_handler(self, protocol: str) -> None:
        self._host.remove_stream_handler(TProtocol(protocol))

    def _refused(self, peer_id: str, protocol: str) -> bool:
        allowed = self.allowed_peers
        if allowed is None or peer_id in allowed:
            return False
        if isinstance(allowed, MemberSource) and allowed.is_revoked(peer_id):
            return True
        stranger_may = isinstance(allowed, MemberSource) and allowed.open_to_strangers
        return not (stranger_may and protocol in self.open_protocols)

    async def _serve(self, stream: INetStream, protocol: str, route: _Route) -> None:
        # Runs in libp2p's task for this stream: nothing but cancellation may escape.
        try:
            peer_id = str(stream.muxed_conn.peer_id)
        except Exception:
            self.stream_errors["internal"] += 1
            await reset_quietly(stream)
            return
        if self._refused(peer_id, protocol):
            # Not a member: no byte of its stream is read, and its connection is dropped.
            self.streams_refused[protocol] += 1
            logger.debug("refused a %s stream from %s: not in the allowlist", protocol, peer_id)
            await reset_quietly(stream)
            self._nursery.start_soon(self._disconnect, peer_id)
            return
        limiter = self.rate_limiter
        if limiter is not None and limiter.available(peer_id, trio.current_time()) < 1:
            self.stream_errors["rate-limited"] += 1
            await reset_quietly(stream)
            return
        if (
            self._open[peer_id] >= self.max_inbound_streams_per_peer
            or self._open.total() >= self.max_inbound_streams
        ):
            # Reset before reading anything: a flooding peer costs us no buffers.
            self.stream_errors["busy"] += 1
            await reset_quietly(stream)
            return
        self._open[peer_id] += 1
        try:
            await self._serve_admitted(stream, peer_id, protocol, route)
        except Exception as error:
            self.stream_errors["internal"] += 1
            logger.warning("inbound %s stream from %s: %s", protocol, peer_id, describe(error))
            await reset_quietly(stream)
        finally:
            self._open[peer_id] -= 1
            if self._open[peer_id] <= 0:
                del self._open[peer_id]

    async def _serve_admitted(
        self, stream: INetStream, peer_id: str, protocol: str, route: _Route
    ) -> None:
        limiter = self.rate_limiter
        source = stream if limiter is None else _MeteredStream(stream, limiter, peer_id)
        rates = route.rates
        rate = None if rates is None else rates.rate(peer_id)
        offer = b""
        max_size = route.max_size
        try:
            if route.screen is not None:
                offer = await read_frame(source, route.max_offer_size, route.read_timeout)
                self._traffic.received += frame_size(len(offer))
                answer, body_size = await route.screen(peer_id, offer)
                await write_frame(stream, answer, route.read_timeout, rate)
                self._traffic.sent += frame_size(len(answer))
                if body_size is None:
                    await close_quietly(stream)
                    return
                max_size = min(body_size, route.max_size)
            started = trio.current_time()
            payload = await read_frame(source, max_size, route.read_timeout, rate)
        except _RateLimited:
            self.stream_errors["rate-limited"] += 1
            await reset_quietly(stream)
            return
        except FrameError as error:
            if rates is not None and error.reason == "timeout":
                rates.timed_out(peer_id)
            self.frame_errors[error.reason] += 1
            logger.debug("inbound %s frame from %s rejected: %s", protocol, peer_id, error)
            await reset_quietly(stream)
            return
        self._traffic.received += frame_size(len(payload))
        if rates is not None:
            rates.completed(peer_id, len(payload), trio.current_time() - started)
        if offer:
            payload = offer + payload
        try:
            reply = await route.handler(peer_id, payload)
        except Exception as error:
            self.stream_errors["handler"] += 1
            # The type and first line only: handler errors may quote the payload.
            logger.warning("handler for %s from %s raised %s", protocol, peer_id, describe(error))
            await reset_quietly(stream)
            return
        if self._gate is not None:
            # A frame its handler took: the peer is not an idle stranger.
            self._gate.manager.note_activity(peer_id)
        if reply is not None:
            try:
                await write_frame(stream, reply, route.read_timeout, rate)
            except Exception as error:
                self.stream_errors["reply"] += 1
                logger.debug("reply on %s to %s failed: %s", protocol, peer_id, describe(error))
                await reset_quietly(stream)
                return
            self._traffic.sent += frame_size(len(reply))
            if limiter is not None:
                # What we serve a peer counts against its budget too (model fetches).
                limiter.charge(peer_id, frame_size(len(reply)), trio.current_time())
        await close_quietly(stream)
