"""Length-prefixed frames on a libp2p stream: ``uvarint(len) || payload``.

The prefix is a multiformats unsigned varint (LEB128, at most 9 bytes, minimally
encoded). Reading enforces the size cap from the prefix alone, before any body byte
is read, and puts the whole frame under one deadline so a peer trickling one byte a
second cannot hold a stream open. The body is read with an own loop because
``libp2p.io.utils.read_exactly`` gives up after 100 partial reads, which large
healthy frames exceed.
"""

from __future__ import annotations

from typing import Literal, Protocol

import trio
from libp2p.network.stream.exceptions import StreamError

from p2pfl.deadlines import frame_deadline

MAX_UVARINT_BYTES = 9
MAX_UVARINT = (1 << (7 * MAX_UVARINT_BYTES)) - 1
# Upper bound of one stream.read: large enough to drain a 16 MiB yamux window in a
# few calls, small enough that a single call never returns an absurd buffer.
READ_CHUNK_BYTES = 4 * 1024 * 1024

FrameErrorReason = Literal["oversize", "malformed", "truncated", "timeout"]
FRAME_ERROR_REASONS: tuple[FrameErrorReason, ...] = (
    "oversize",
    "malformed",
    "truncated",
    "timeout",
)


class FrameError(Exception):
    """A frame that could not be read or written; ``reason`` is one of FRAME_ERROR_REASONS."""

    def __init__(self, reason: FrameErrorReason, detail: str = "") -> None:
        self.reason: FrameErrorReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ReadableStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...


class WritableStream(Protocol):
    async def write(self, data: bytes) -> None: ...


def encode_uvarint(value: int) -> bytes:
    """The unsigned varint of ``value`` (0 <= value < 2**63)."""
    if not 0 <= value <= MAX_UVARINT:
        raise ValueError(f"uvarint out of range: {value} (allowed 0..{MAX_UVARINT})")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_uvarint(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Decode a varint at the start of ``data``: (value, bytes used).

    FrameError("truncated") if ``data`` ends inside the varint, FrameError("malformed")
    if it is longer than 9 bytes or not minimally encoded (the spec forbids both, and
    accepting them would give one length several encodings).
    """
    value = 0
    for index in range(min(len(data), MAX_UVARINT_BYTES)):
        byte = data[index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if byte == 0 and index > 0:
                raise FrameError("malformed", "non-minimal varint")
            return value, index + 1
    if len(data) >= MAX_UVARINT_BYTES:
        raise FrameError("malformed", f"varint longer than {MAX_UVARINT_BYTES} bytes")
    raise FrameError("truncated", "data ends inside the varint")


async def write_frame(
    stream: WritableStream, payload: bytes, timeout: float, min_bytes_per_s: float | None = None
) -> None:
    """Write one frame; FrameError("timeout") if it does not finish within its deadline
    (:func:`frame_deadline`).

    Stream errors (reset, closed) propagate unchanged for the caller to report.
    """
    timeout = frame_deadline(timeout, len(payload), min_bytes_per_s)
    with trio.move_on_after(timeout) as scope:
        # Two writes instead of prefix + payload: concatenating would copy the payload.
        await stream.write(encode_uvarint(len(payload)))
        if payload:
            await stream.write(payload)
    if scope.cancelled_caught:
        raise FrameError("timeout", f"writing {len(payload)} bytes took over {timeout:g} s")


async def read_frame(
    stream: ReadableStream, max_size: int, timeout: float, min_bytes_per_s: float | None = None
) -> bytes | bytearray:
    """Read one frame of at most ``max_size`` payload bytes within its deadline.

    The deadline is ``timeout`` for the whole frame, extended by the announced
    length at ``min_bytes_per_s`` once that length is known and within the cap
    (:func:`frame_deadline`), so a trickling peer is still cut off.
    FrameError reasons: "oversize" (announced length > max_size; no body byte is read),
    "malformed" (bad varint), "truncated" (the stream ended or was reset mid-frame, or
    carried no frame at all), "timeout" (the whole frame took longer than its deadline).
    """
    with trio.move_on_after(timeout) as scope:
        return await _read_frame_unbounded(stream, max_size, scope, min_bytes_per_s)
    raise FrameError("timeout", f"no complete frame within {timeout:g} s") from None


async def _read_frame_unbounded(
    stream: ReadableStream,
    max_size: int,
    scope: trio.CancelScope | None = None,
    min_bytes_per_s: float | None = None,
) -> bytes | bytearray:
    try:
        length = await _read_length(stream)
        if length > max_size:
            raise FrameError("oversize", f"announced {length} bytes, limit {max_size}")
        if scope is not None and min_bytes_per_s is not None:
            scope.deadline += length / min_bytes_per_s
        return await _read_body(stream, length)
    except (StreamError, EOFError) as error:
        # StreamEOF and StreamReset both mean the peer stopped mid-frame.
        raise FrameError("truncated", type(error).__name__) from None


async def _read_length(stream: ReadableStream) -> int:
    # Byte by byte: reading more could consume body bytes we must not read when the
    # length turns out to be over the cap (and the body is read separately anyway).
    header = bytearray()
    while True:
        byte = await stream.read(1)
        if not byte:
            raise FrameError("truncated", "stream ended inside the length prefix")
        header += byte
        if not byte[0] & 0x80 or len(header) >= MAX_UVARINT_BYTES:
            return decode_uvarint(header)[0]


async def _read_body(stream: ReadableStream, length: int) -> bytes | bytearray:
    first = await stream.read(min(length, READ_CHUNK_BYTES)) if length else b""
    if len(first) == length:
        return first  # one read held the whole frame: no copy at all
    # Larger frames are copied into one buffer as they arrive, rather than kept as
    # chunks and joined at the end: that held every byte twice at the join (89 MB
    # for one ResNet-18 update, per concurrent stream).
    body = bytearray(length)
    view = memoryview(body)
    filled = 0
    chunk = first
    while True:
        if not chunk:
            raise FrameError("truncated", f"stream ended {length - filled} bytes before frame end")
        if len(chunk) > length - filled:  # a stream must not return more than asked
            raise FrameError("malformed", "stream returned more bytes than requested")
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
        if filled == length:
            return body
        chunk = await stream.read(min(length - filled, READ_CHUNK_BYTES))
