"""Cheap work before the signature: msgpack limits on the update header, bounded logs.

A header is parsed before its signature can be checked, so anyone who can open a
stream can make the node parse one. msgpack's own limits refuse a container or
string at its length prefix, before a single element is built.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import trio
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.peer.id import ID
from runtimes import push_update, wait_until
from test_hostile_peer import LOOPBACK, rejected, running_daemon

from fltasks import Task
from gossip import NodeKey
from gossip.codec import FORMAT_VERSION, MAGIC, MAX_HEADER_BYTES, PREFIX_BYTES, parse
from gossip.errors import InvalidUpdate, Reason
from p2pfl.ratelimit import LogThrottle
from p2pfl.runtime import MAX_REJECTION_DETAIL_CHARS
from p2pfl.transport import Transport

pytestmark = pytest.mark.integration

MIB = 1 << 20
FLOOD = 30


def message_with_header(header: bytes) -> bytes:
    prefix = MAGIC + bytes([FORMAT_VERSION]) + bytes(64) + struct.pack("<I", len(header))
    assert len(prefix) == PREFIX_BYTES
    return prefix + header


def map_of_unknown_keys(size: int) -> bytes:
    """A msgpack map of ``size`` distinct unknown keys, close to 1 MiB for 100,000."""
    return msgpack.packb({f"k{i:07d}": 0 for i in range(size)})


HOSTILE_HEADERS: dict[str, Callable[[], bytes]] = {
    "max_map_len": lambda: map_of_unknown_keys(100_000),
    "max_array_len": lambda: msgpack.packb({"tensors": [0] * 600_000}),
    "max_str_len": lambda: msgpack.packb({"codec": "x" * (MIB - 64)}),
    "max_bin_len": lambda: msgpack.packb({"sender": b"x" * (MIB - 64)}, use_bin_type=True),
}


@pytest.mark.parametrize("limit", sorted(HOSTILE_HEADERS))
def test_a_1_mib_hostile_header_is_refused_at_its_length_prefix(limit: str) -> None:
    header = HOSTILE_HEADERS[limit]()
    assert MIB // 2 < len(header) <= MAX_HEADER_BYTES
    with pytest.raises(InvalidUpdate) as refused:
        parse(message_with_header(header))
    assert refused.value.reason is Reason.MALFORMED
    # msgpack names the limit it hit: it refused the length prefix, built nothing.
    assert limit in refused.value.detail
    assert len(refused.value.detail) < 200


def test_the_log_throttle_lets_one_line_per_key_and_interval_through() -> None:
    throttle = LogThrottle(10.0)
    assert throttle.admit(("p", "malformed"), 0.0) == 0
    assert [throttle.admit(("p", "malformed"), t) for t in (1.0, 2.0, 9.9)] == [None] * 3
    assert throttle.admit(("p", "bad-signature"), 3.0) == 0
    assert throttle.admit(("p", "malformed"), 10.0) == 3


async def test_a_flood_of_hostile_headers_is_all_counted_in_one_short_log_line(
    digits: Task, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfl.receiving")
    member = NodeKey.generate()
    # Small enough that 30 of them fit the member's byte budget: all reach admission.
    payload = message_with_header(map_of_unknown_keys(2_000))
    with trio.fail_after(120):
        async with (
            running_daemon(digits, tmp_path / "node", [member.peer_id]) as (node, _),
            Transport.open(member, [LOOPBACK]) as attacker,
        ):
            await attacker.connect(node.transport.addrs[0], timeout=5)
            for _ in range(FLOOD):
                await push_update(attacker, node.key.peer_id, payload, 5)
            await wait_until(lambda: rejected(node)["malformed"] == FLOOD)
    lines = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith(f"rejected an update from {member.peer_id}")
    ]
    assert len(lines) == 1
    assert len(lines[0]) < len(member.peer_id) + MAX_REJECTION_DETAIL_CHARS + 100


async def test_an_update_from_a_non_ed25519_peer_is_counted_as_unsupported_key(
    digits: Task, tmp_path: Path
) -> None:
    # GatedNoise closes such a peer's connection first (tests/test_connection_gate.py);
    # should one still deliver an update, it is refused and counted, not a handler error.
    secp_peer = str(ID.from_pubkey(create_secp256k1_key_pair().public_key))
    async with running_daemon(digits, tmp_path / "node", []) as (node, _):
        await node.inbound.on_offer(secp_peer, b"anything")
        assert rejected(node)["unsupported-key"] == 1
