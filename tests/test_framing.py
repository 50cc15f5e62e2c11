"""Unit tests of the frame codec: varints, and read_frame's limits on a scripted stream.

The stream here is a byte script with libp2p's read semantics (``read(n)`` returns up to
n bytes, raises StreamEOF at the end); the same rules are checked over real libp2p hosts
in test_transport.py.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from p2pfl.framing import (
    MAX_UVARINT,
    FrameError,
    decode_uvarint,
    encode_uvarint,
    read_frame,
    write_frame,
)

pytestmark = pytest.mark.property


class ScriptedStream:
    """Serves ``data`` in reads of at most ``chunk`` bytes, sleeping ``delay`` before each."""

    def __init__(
        self, data: bytes, chunk: int = 1 << 20, delay: float = 0.0, end: type = StreamEOF
    ) -> None:
        self.data = data
        self.chunk = chunk
        self.delay = delay
        self.end = end
        self.position = 0
        self.written = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        if self.delay:
            await trio.sleep(self.delay)
        if self.position >= len(self.data):
            raise self.end()
        size = min(n or self.chunk, self.chunk)
        piece = self.data[self.position : self.position + size]
        self.position += len(piece)
        return piece

    async def write(self, data: bytes) -> None:
        self.written += data


@given(st.integers(min_value=0, max_value=MAX_UVARINT))
def test_uvarint_round_trip(value: int) -> None:
    encoded = encode_uvarint(value)
    assert len(encoded) <= 9
    assert decode_uvarint(encoded + b"\xff") == (value, len(encoded))


@given(st.binary(max_size=16))
def test_decode_uvarint_fails_only_with_frame_error(data: bytes) -> None:
    try:
        value, used = decode_uvarint(data)
    except FrameError as error:
        assert error.reason in {"malformed", "truncated"}
    else:
        assert encode_uvarint(value) == data[:used]


def test_uvarint_known_encodings() -> None:
    assert encode_uvarint(0) == b"\x00"
    assert encode_uvarint(127) == b"\x7f"
    assert encode_uvarint(128) == b"\x80\x01"
    assert encode_uvarint(300) == b"\xac\x02"


@pytest.mark.parametrize("value", [-1, MAX_UVARINT + 1])
def test_encode_uvarint_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_uvarint(value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x80\x80", "truncated"),
        (b"\xff" * 9, "malformed"),  # a tenth byte would be needed
        (b"\x80\x00", "malformed"),  # non-minimal encoding of 0
    ],
)
def test_decode_uvarint_errors(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as caught:
        decode_uvarint(data)
    assert caught.value.reason == reason


async def test_write_then_read_round_trip_in_one_byte_reads() -> None:
    sink = ScriptedStream(b"")
    await write_frame(sink, b"hello frames", timeout=1)
    source = ScriptedStream(bytes(sink.written), chunk=1)
    assert await read_frame(source, max_size=100, timeout=1) == b"hello frames"


async def test_empty_payload_round_trip() -> None:
    sink = ScriptedStream(b"")
    await write_frame(sink, b"", timeout=1)
    assert bytes(sink.written) == b"\x00"
    assert await read_frame(ScriptedStream(bytes(sink.written)), max_size=0, timeout=1) == b""


async def test_oversize_is_rejected_without_reading_the_body() -> None:
    stream = ScriptedStream(encode_uvarint(1001) + b"x" * 1001)
    with pytest.raises(FrameError) as caught:
        await read_frame(stream, max_size=1000, timeout=1)
    assert caught.value.reason == "oversize"
    assert stream.position == len(encode_uvarint(1001))


@pytest.mark.parametrize("end", [StreamEOF, StreamReset])
async def test_stream_ending_mid_body_is_truncated(end: type) -> None:
    stream = ScriptedStream(encode_uvarint(100) + b"x" * 40, end=end)
    with pytest.raises(FrameError) as caught:
        await read_frame(stream, max_size=1000, timeout=1)
    assert caught.value.reason == "truncated"


async def test_overlong_prefix_on_the_stream_is_malformed() -> None:
    stream = ScriptedStream(b"\xff" * 20)
    with pytest.raises(FrameError) as caught:
        await read_frame(stream, max_size=1 << 40, timeout=1)
    assert caught.value.reason == "malformed"
    assert stream.position == 9


async def test_trickling_peer_hits_the_whole_frame_deadline() -> None:
    # Each read makes progress, so only a deadline over the whole frame can stop it.
    clock = trio.testing.MockClock(autojump_threshold=0)
    stream = ScriptedStream(encode_uvarint(50) + b"x" * 50, chunk=1, delay=1.0)

    async def scenario() -> None:
        started = trio.current_time()
        with pytest.raises(FrameError) as caught:
            await read_frame(stream, max_size=1000, timeout=10)
        assert caught.value.reason == "timeout"
        assert trio.current_time() - started == pytest.approx(10)

    # A fresh run so the mock clock does not leak into pytest-trio's loop.
    await trio.to_thread.run_sync(lambda: trio.run(scenario, clock=clock))


async def test_large_payload_in_many_partial_reads() -> None:
    # More than read_exactly's 100 partial reads, which is what it failed on.
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = ScriptedStream(encode_uvarint(len(payload)) + payload, chunk=3000)
    assert await read_frame(stream, max_size=len(payload), timeout=5) == payload


async def test_a_large_frame_on_a_slow_link_gets_a_deadline_that_grows_with_its_size() -> None:
    # 100 KB arriving at 20 KB/s (1 KB every 0.05 s): 5 s, past a fixed 1 s deadline,
    # inside 1 s + 100 KB / 20 KB/s = 6 s.
    payload = bytes(100_000)
    framed = encode_uvarint(len(payload)) + payload

    async def scenario() -> None:
        with pytest.raises(FrameError) as caught:
            await read_frame(ScriptedStream(framed, 1000, 0.05), max_size=1 << 20, timeout=1)
        assert caught.value.reason == "timeout"
        slow = ScriptedStream(framed, 1000, 0.05)
        got = await read_frame(slow, max_size=1 << 20, timeout=1, min_bytes_per_s=20_000)
        assert got == payload

    clock = trio.testing.MockClock(autojump_threshold=0)
    await trio.to_thread.run_sync(lambda: trio.run(scenario, clock=clock))


async def test_a_size_scaled_deadline_still_cuts_off_a_trickling_peer() -> None:
    # The announced length buys its own transfer time at the given rate, no more: a
    # 3-byte length read by 3 s extends a 5 s deadline by 1 MB / 1 MB/s, to 6 s, and
    # a body trickling one byte a second is cut off there.
    stream = ScriptedStream(encode_uvarint(1_000_000) + b"x" * 100, chunk=1, delay=1.0)

    async def scenario() -> None:
        started = trio.current_time()
        with pytest.raises(FrameError) as caught:
            await read_frame(stream, max_size=1 << 21, timeout=5, min_bytes_per_s=1_000_000)
        assert caught.value.reason == "timeout"
        assert trio.current_time() - started == pytest.approx(6)

    clock = trio.testing.MockClock(autojump_threshold=0)
    await trio.to_thread.run_sync(lambda: trio.run(scenario, clock=clock))
