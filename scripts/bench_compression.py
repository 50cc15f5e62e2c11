"""Measure each tensor codec's encode+decode speed against a memory copy, and its size.

For N float32 values (10M by default, normally distributed), each codec's
round trip (allocate the payload, encode into it, decode it back) is timed
and reported as MB/s of raw float32 input, next to the rate of
``bytearray(buffer)`` over the same raw bytes, measured in the same run and
interleaved with the codec so that machine load hits both alike. Times are
the best of ``--repeat`` runs. One JSON object per line: a ``memcpy`` line,
one per codec (``mb_per_s``, ``vs_memcpy``, ``bytes_vs_raw``,
``max_abs_error``, ``meets_goal``: at least 25% of the memcpy rate), and a
``summary`` line. Exits 1 with ``--strict`` if any codec misses the goal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np

from gossip.compression import TensorCodec, resolve_codec

GOAL_VS_MEMCPY = 0.25
CODECS = ["raw", "fp16", "int8", "topk:0.01", "topk:0.1"]


def elapsed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def round_trip(tensor_codec: TensorCodec, array: np.ndarray) -> tuple[int, np.ndarray]:
    payload = bytearray(tensor_codec.payload_size(array))
    tensor_codec.encode_into(array, memoryview(payload))
    return len(payload), tensor_codec.decode(memoryview(payload), array.dtype, array.shape)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=10_000_000, help="float32 values")
    parser.add_argument("--repeat", type=int, default=7, help="runs per measurement; best kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codecs", nargs="+", default=CODECS, help="codec ids to measure")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a codec misses the goal")
    args = parser.parse_args(argv)

    array = np.random.default_rng(args.seed).standard_normal(args.values).astype(np.float32)
    raw_bytes = array.tobytes()
    megabytes = len(raw_bytes) / 1e6
    memcpy_best = float("inf")
    results = []
    for codec_id in args.codecs:
        tensor_codec = resolve_codec(codec_id)
        if tensor_codec is None:
            parser.error(f"unknown codec id {codec_id!r}")
        size, decoded = round_trip(tensor_codec, array)  # warm up, and check the output
        codec_best = float("inf")
        for _ in range(args.repeat):  # interleaved, so load changes hit both sides alike
            memcpy_best = min(memcpy_best, elapsed(lambda: bytearray(raw_bytes)))
            codec_best = min(codec_best, elapsed(lambda c=tensor_codec: round_trip(c, array)))
        results.append((codec_id, codec_best, size, float(np.abs(decoded - array).max())))

    memcpy_rate = megabytes / memcpy_best
    print(json.dumps({"kind": "memcpy", "values": args.values, "mb_per_s": round(memcpy_rate)}))
    all_meet = True
    for codec_id, seconds, size, error in results:
        rate = megabytes / seconds
        meets = rate >= GOAL_VS_MEMCPY * memcpy_rate
        all_meet &= meets
        line = {
            "kind": "codec",
            "codec": codec_id,
            "values": args.values,
            "mb_per_s": round(rate),
            "vs_memcpy": round(rate / memcpy_rate, 3),
            "bytes": size,
            "bytes_vs_raw": round(size / len(raw_bytes), 4),
            "max_abs_error": error,
            "meets_goal": meets,
        }
        print(json.dumps(line))
    print(json.dumps({"kind": "summary", "goal_vs_memcpy": GOAL_VS_MEMCPY, "all_meet": all_meet}))
    return 1 if args.strict and not all_meet else 0


if __name__ == "__main__":
    sys.exit(main())
