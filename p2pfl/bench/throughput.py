"""Benchmark part (b): the throughput of one update exchange.

Part (b), throughput of one update exchange, in ONE trio process holding both
ends (so sender and receiver take turns on one event loop and their CPU costs
add up; two processes would likely do better). Two ``p2pfl.transport.Transport``
hosts on 127.0.0.1 (``p2pfl.host.new_node_host``: Noise, yamux; the receiver
meters inbound bytes per peer as the daemon does, with a budget no run can
exhaust) connect once before timing; each transfer opens a new stream, as the
node does. For float32 models of 262,144 and 2,097,152 values (1 MiB and 8 MiB
of tensor data), best of ``--repeats`` runs, the methods taking turns so that
load from other work on a shared machine hits them alike:

* ``stream_mb_s``: the node's whole update path: ``GossipNode.prepare`` (flatten,
  encode, BLAKE3 + ed25519 sign) on the sender, ``Transport.send`` on
  ``/p2pfl/update/1.0.0`` (varint frame, half-close), and on the receiver
  ``read_frame`` then ``Admission.admit`` (parse, verify, decode, checks); timed
  from the start of ``prepare`` until the receiver's verdict (a ``trio.Event``);
* ``bare_libp2p_mb_s``: the same hosts and connection, a bare protocol:
  ``new_stream``, one ``write`` of as many raw bytes as the encoded update,
  ``close``; the handler reads until EOF; timed until the receiver has every byte;
* ``raw_tcp_mb_s``: one ``trio.open_tcp_stream`` connection to ``trio.serve_tcp``
  (opened before timing), ``send_all`` of the same bytes; timed until the receiver
  has them all.

A diagnostic, ``framed_only_mb_s``: ``Transport.send`` of ready-made bytes to a
handler that does nothing (the stream path without prepare and admit), separating
what framing and the Transport cost from what encoding and verifying cost.

MB is 10**6 bytes of the encoded update. The stream path is also split into its
parts (prepare, transfer until the frame is read, admit) from the same best run,
and ``stream_vs_bare_ratio`` (goal >= 0.9) compares the whole path with bare
libp2p. The machine may be shared: every figure is a best of N, and the learning
run is one run (repeat the script to see its spread).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from gossip import AdmissionPolicy, GossipNode, NodeKey
from gossip.admission import Admission
from gossip.keys import public_key_from_peer_id
from p2pfl.config import NodeConfig
from p2pfl.framing import READ_CHUNK_BYTES, encode_uvarint
from p2pfl.ratelimit import PeerRateLimiter
from p2pfl.runtime import UPDATE_PROTOCOL
from p2pfl.transport import Transport

READ_TIMEOUT_S = NodeConfig().deadlines.read  # the daemon's default

SIZES = {"1MB": 262_144, "8MB": 2_097_152}
BARE_PROTOCOL = "/p2pfl/bench/bare/1.0.0"
FRAMED_PROTOCOL = "/p2pfl/bench/framed/1.0.0"
TRANSFER_TIMEOUT_S = 30.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


# -- (b) throughput -----------------------------------------------------------------------


Once = Callable[[], Awaitable[dict[str, float]]]


async def interleaved_best(repeats: int, methods: dict[str, Once]) -> dict[str, dict[str, float]]:
    """Best (smallest ``total``) run of each method, the methods taking turns.

    Taking turns, rather than running all repeats of one method and then the next,
    spreads the load of other work on a shared machine over every method alike.
    One warm-up run each first (first-stream costs, window growth, the allocator).
    """
    for once in methods.values():
        await once()
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for name, once in methods.items():
            run = await once()
            if name not in best or run["total"] < best[name]["total"]:
                best[name] = run
    return best


def _random_bytes(size: int) -> bytes:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()


def stream_method(
    sender: Transport, sender_key: NodeKey, receiver: Transport, values: int
) -> tuple[Once, int]:
    """The whole update path; returns (one timed run, encoded message size)."""
    model = {"w": np.random.default_rng(values).standard_normal(values, dtype=np.float32)}
    # The sender's transport key signs: the receiver checks it against the connection's peer.
    sending = GossipNode.create(sender_key, model, samples=1000)
    admission = Admission(AdmissionPolicy(fingerprint=sending.layout.fingerprint))
    state: dict[str, Any] = {}

    async def on_update(peer_id: str, payload: bytes) -> None:
        state["read"] = time.perf_counter()
        state["verdict"] = admission.admit(payload, time.time(), public_key_from_peer_id(peer_id))
        state["done"] = time.perf_counter()
        state["event"].set()
        return None

    max_size = admission.policy.max_message_bytes
    receiver.set_handler(UPDATE_PROTOCOL, on_update, max_size, READ_TIMEOUT_S)

    async def once() -> dict[str, float]:
        state.clear()
        state["event"] = trio.Event()
        with trio.fail_after(TRANSFER_TIMEOUT_S):
            start = time.perf_counter()
            outgoing = sending.prepare(1, time.time())
            prepared = time.perf_counter()
            await sender.send(receiver.peer_id, UPDATE_PROTOCOL, outgoing.message, READ_TIMEOUT_S)
            await state["event"].wait()
        if not state["verdict"].accepted:
            raise RuntimeError(f"the receiver rejected the update: {state['verdict']}")
        sending.refund(outgoing)  # keep the sender's weight steady across runs (untimed)
        return {
            "total": state["done"] - start,
            "prepare": prepared - start,
            "transfer": state["read"] - prepared,
            "admit": state["done"] - state["read"],
        }

    probe = sending.prepare(1, time.time())
    sending.refund(probe)
    return once, len(probe.message)


def framed_method(sender: Transport, receiver: Transport, size: int) -> Once:
    """Diagnostic: ``Transport.send`` of ready-made bytes to a handler that does nothing.

    The stream path minus prepare and admit: what framing and the Transport cost over
    a bare stream.
    """
    data = _random_bytes(size)
    state: dict[str, Any] = {}

    async def handler(peer_id: str, payload: bytes) -> None:
        state["received"] = len(payload)
        state["done"] = time.perf_counter()
        state["event"].set()
        return None

    receiver.set_handler(FRAMED_PROTOCOL, handler, size, READ_TIMEOUT_S)

    async def once() -> dict[str, float]:
        state.clear()
        state["event"] = trio.Event()
        with trio.fail_after(TRANSFER_TIMEOUT_S):
            start = time.perf_counter()
            await sender.send(receiver.peer_id, FRAMED_PROTOCOL, data, READ_TIMEOUT_S)
            await state["event"].wait()
        if state["received"] != size:
            raise RuntimeError(f"framed stream delivered {state['received']} of {size} bytes")
        return {"total": state["done"] - start}

    return once


def bare_method(sender: Transport, receiver: Transport, size: int) -> Once:
    """A bare libp2p stream on the same hosts: new_stream, one write, close; read to EOF."""
    data = _random_bytes(size)
    state: dict[str, Any] = {}

    async def handler(stream: Any) -> None:
        received = 0
        try:
            while True:
                chunk = await stream.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                received += len(chunk)
        except StreamEOF:
            pass
        state["received"] = received
        state["done"] = time.perf_counter()
        state["event"].set()
        await stream.close()

    receiver.host.set_stream_handler(TProtocol(BARE_PROTOCOL), handler)
    remote = ID.from_base58(receiver.peer_id)

    async def once() -> dict[str, float]:
        state.clear()
        state["event"] = trio.Event()
        with trio.fail_after(TRANSFER_TIMEOUT_S):
            start = time.perf_counter()
            stream = await sender.host.new_stream(remote, [TProtocol(BARE_PROTOCOL)])
            await stream.write(data)
            await stream.close()
            await state["event"].wait()
        if state["received"] != size:
            raise RuntimeError(f"bare stream delivered {state['received']} of {size} bytes")
        return {"total": state["done"] - start}

    return once


async def tcp_method(nursery: trio.Nursery, size: int) -> tuple[Once, trio.SocketStream]:
    """One raw trio TCP connection, opened now; each run sends ``size`` bytes on it."""
    data = _random_bytes(size)
    state: dict[str, Any] = {}

    async def handler(stream: trio.SocketStream) -> None:
        while True:
            received = 0
            while received < size:
                chunk = await stream.receive_some(READ_CHUNK_BYTES)
                if not chunk:
                    return
                received += len(chunk)
            state["done"] = time.perf_counter()
            state["event"].set()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    stream = await trio.open_tcp_stream("127.0.0.1", port)

    async def once() -> dict[str, float]:
        state.clear()
        state["event"] = trio.Event()
        with trio.fail_after(TRANSFER_TIMEOUT_S):
            start = time.perf_counter()
            await stream.send_all(data)
            await state["event"].wait()
        return {"total": state["done"] - start}

    return once, stream


async def measure_throughput(repeats: int) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    sender_key = NodeKey.generate()
    # The receiver meters inbound bytes per peer as the daemon does, with a budget no
    # benchmark run can exhaust: the metering's cost is measured, not its policy.
    limiter = PeerRateLimiter(1e15, 1e15)
    async with (
        Transport.open(sender_key, [LOOPBACK]) as sender,
        Transport.open(NodeKey.generate(), [LOOPBACK], rate_limiter=limiter) as receiver,
    ):
        await sender.connect(receiver.addrs[0], timeout=10)  # connection setup, untimed
        for label, values in SIZES.items():
            stream_once, size = stream_method(sender, sender_key, receiver, values)
            frame_bytes = len(encode_uvarint(size)) + size
            async with trio.open_nursery() as nursery:
                tcp_once, tcp_stream = await tcp_method(nursery, frame_bytes)
                best = await interleaved_best(
                    repeats,
                    {
                        "stream": stream_once,
                        "framed": framed_method(sender, receiver, size),
                        "bare": bare_method(sender, receiver, frame_bytes),
                        "tcp": tcp_once,
                    },
                )
                await tcp_stream.aclose()
                nursery.cancel_scope.cancel()
            for protocol in (UPDATE_PROTOCOL, FRAMED_PROTOCOL, BARE_PROTOCOL):
                receiver.remove_handler(protocol)
            stream, framed, bare, tcp = (
                best[name]["total"] for name in ("stream", "framed", "bare", "tcp")
            )
            megabytes = size / 1e6
            results[label] = {
                "values": values,
                "message_bytes": size,
                "stream_mb_s": round(megabytes / stream, 1),
                "bare_libp2p_mb_s": round(megabytes / bare, 1),
                "raw_tcp_mb_s": round(megabytes / tcp, 1),
                "framed_only_mb_s": round(megabytes / framed, 1),
                "stream_vs_bare_ratio": round(bare / stream, 3),
                "stream_ms": {k: round(v * 1e3, 2) for k, v in best["stream"].items()},
                "framed_only_ms": round(framed * 1e3, 2),
                "bare_libp2p_ms": round(bare * 1e3, 2),
                "raw_tcp_ms": round(tcp * 1e3, 2),
            }
    return results
