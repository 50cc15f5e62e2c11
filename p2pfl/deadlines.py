"""Every deadline the daemon keeps, named once.

Each network wait in the daemon is bounded by one of these, so that a dead,
slow or hostile peer costs a bounded time and never a stall. The ones an
operator may need to change are settings (``--send-timeout``,
``--read-timeout``, ``--min-link-mbit``, declared in :class:`p2pfl.config.NodeConfig`);
the others are fixed here. Deadlines for whole models grow with the message's
size at the peer's link rate (:func:`frame_deadline`,
:mod:`p2pfl.linkrates`): a fixed 5 s cut off every 4.5 MB update on a
10 Mbit/s link (measured in the lab).
"""

from __future__ import annotations

from dataclasses import dataclass

# One dial: TCP, Noise and yamux together (a dial that the kernel refuses fails at once).
DIAL_S = 5.0
# Reading one HTTP request on the status server.
STATUS_READ_S = 5.0
# Resetting or closing a stream we are done with (shielded from cancellation).
STREAM_CLEANUP_S = 1.0
# Closing the libp2p host at shutdown.
HOST_CLOSE_S = 5.0
# What a handshake's few small messages may wait behind on a link busy with large
# updates: one yamux receive window (256 KiB) each way. In the lab at 1 Mbit/s per
# host (6 streams each), a fixed 5 s failed stream negotiations every few seconds, and
# so did 5 s plus one 64 KiB frame each way (12 s); dials failed too, so peers were
# marked unreachable and missed top-k differences.
HANDSHAKE_WAIT_BYTES = 2 * 256 * 1024
# The link rate handshakes and joining's model fetch assume without --min-link-mbit
# (updates' deadlines follow each link's measured rate instead: p2pfl/linkrates.py).
# Slow on purpose, as a link not yet measured: at 8 Mbit/s (5.5 s) 8 lab hosts at
# 1 Mbit/s failed about 100 stream negotiations each in 480 s, behind the updates
# that fill their uplinks, and those pushes failed with them. At 0.25: 21.8 s.
HANDSHAKE_LINK_MBIT = 0.25


def frame_deadline(timeout: float, length: int, min_bytes_per_s: float | None) -> float:
    """Seconds a frame of ``length`` bytes may take: ``timeout``, plus its size at the
    slowest rate the node must serve (None: a fixed deadline whatever the size).

    A fixed deadline capped models by size: a 4.5 MB update never crossed a
    10 Mbit/s link within 5 s (measured in the network lab).
    """
    if min_bytes_per_s is None:
        return timeout
    return timeout + length / min_bytes_per_s



@dataclass(frozen=True)
class Deadlines:
    """The daemon's deadlines for one configuration (``NodeConfig.deadlines``)."""

    send: float
    """A push's fixed part: stream, frame, receipt; it grows by the update's size."""
    read: float
    """An inbound frame's fixed part; it grows by the announced size."""
    min_link_bytes_per_s: float
    """The slowest link a whole model must cross, in bytes per second."""
    dial: float = DIAL_S
    status_read: float = STATUS_READ_S

    def push(self, message_bytes: int, link_bytes_per_s: float) -> float:
        """Seconds a push of ``message_bytes`` (and its receipt) may take at the peer's
        link rate (p2pfl/linkrates.py)."""
        return frame_deadline(self.send, message_bytes, link_bytes_per_s)

    def model_fetch(self, parameters: int) -> float:
        """Seconds fetching a joining node's snapshot of ``parameters`` float32 values may take."""
        return frame_deadline(self.dial, 4 * parameters, self.min_link_bytes_per_s)

    @property
    def handshake(self) -> float:
        """A dial (TCP, Noise, yamux) or a stream's protocol negotiation: a few small
        messages, each of which may queue behind large updates on a busy link."""
        return frame_deadline(self.dial, HANDSHAKE_WAIT_BYTES, self.min_link_bytes_per_s)

    @property
    def peer_exchange(self) -> float:
        """A peer-exchange request and its reply (small: a handshake's worth)."""
        return self.handshake
