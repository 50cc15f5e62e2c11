"""CPU cost of refusing a hostile 1 MiB update header, against parsing it without limits.

The header of an update is parsed before its signature can be checked, so anyone
who can open a stream can make a node parse one. ``gossip.codec.parse`` gives
msgpack element limits; the reference is the same bytes unpacked as before those
limits (no limits, the header's own length as the only bound), measured in the same
run. Goal: under 10 ms per refused header.

    PYTHONPATH=. python scripts/bench_header.py
"""

from __future__ import annotations

import struct
import time

import msgpack

# The duplicate-key hook is what parse used before the limits too: the reference
# repeats that call exactly, minus the limits.
from gossip.codec import FORMAT_VERSION, MAGIC, MAX_HEADER_BYTES, _no_duplicate_keys, parse
from gossip.errors import InvalidUpdate

REPEATS = 20


def hostile_message() -> bytes:
    header = msgpack.packb({f"k{i:07d}": 0 for i in range(100_000)})
    assert len(header) <= MAX_HEADER_BYTES
    return MAGIC + bytes([FORMAT_VERSION]) + bytes(64) + struct.pack("<I", len(header)) + header


def best_of(action: object, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        action()  # type: ignore[operator]
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    message = hostile_message()
    header = message[73:]

    def refuse() -> None:
        try:
            parse(message)
        except InvalidUpdate:
            return
        raise AssertionError("the hostile header was accepted")

    def unlimited() -> None:
        msgpack.unpackb(
            header, raw=False, strict_map_key=True, object_pairs_hook=_no_duplicate_keys
        )

    limited_s, reference_s = best_of(refuse), best_of(unlimited, repeats=5)
    print(f"hostile header: {len(header):,} bytes, a map of 100,000 unknown keys")
    print(f"refused by parse (msgpack limits): {limited_s * 1e3:.3f} ms CPU")
    print(f"unpacked without limits (reference): {reference_s * 1e3:.1f} ms CPU")
    print(f"ratio reference / limited: {reference_s / max(limited_s, 1e-9):,.0f}x")


if __name__ == "__main__":
    main()
