"""What the transport's parts share: its errors, its byte counts, stream clean-up.

p2pfl.transport (the facade and outbound exchanges), p2pfl.dialling and p2pfl.inbound
each use these; none of them imports another's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from p2pfl.deadlines import STREAM_CLEANUP_S
from p2pfl.framing import encode_uvarint


class TransportError(Exception):
    """An outbound operation failed; the message is one line naming the peer and the cause.

    ``timed_out``: it missed its deadline (a slow link or a dead one), rather than
    being refused or reset."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Unanswered(TransportError):
    """The request's whole frame was written but no reply came back: whether the peer
    received it is not known. A failure before the frame's last byte was handed to the
    connection raises a plain :class:`TransportError`: the peer cannot hold a whole
    frame then (trio never cancels a socket send that went through)."""


@dataclass
class Traffic:
    """Frame bytes (length prefix included) this host sent and received, both ways."""

    sent: int = 0
    received: int = 0


def describe(error: BaseException) -> str:
    """One line for an exception from libp2p (whose messages may span many lines)."""
    if isinstance(error, BaseExceptionGroup) and error.exceptions:
        return describe(error.exceptions[0])
    text = str(error).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def frame_size(payload_length: int) -> int:
    return len(encode_uvarint(payload_length)) + payload_length


def full_addr(addr: Multiaddr, peer_id: str) -> str:
    text = str(addr)
    return text if "/p2p/" in text else f"{text}/p2p/{peer_id}"


def parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception:
        raise ValueError(f"not a peer id: {peer_id!r}") from None


# Closing or resetting a stream writes one small muxer frame; on a wedged connection
# that write must not hold up the handler task (or host shutdown) for long.
async def reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(STREAM_CLEANUP_S):
        try:
            await stream.reset()
        except Exception:  # the stream is being discarded; nothing left to report
            pass


async def close_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(STREAM_CLEANUP_S):
        try:
            await stream.close()
        except Exception:
            await reset_quietly(stream)
