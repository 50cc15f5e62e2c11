"""Benchmark the update codec against a plain memory copy measured in the same run.

For models of 1M and 10M float32 parameters (a few named tensors, like a small
MLP), this measures, best of N runs each:

* ``encode_sign_mb_s``: ``gossip.codec.encode`` (msgpack header, tensor bytes
  copied into one buffer, BLAKE3 of the body, ed25519 signature of the digest);
* ``verify_decode_mb_s``: ``gossip.codec.decode`` (size cap, header parse and
  schema check, BLAKE3 + signature verification, zero-copy tensor views);
* ``memcpy_mb_s``: ``bytearray(message)``, allocating and copying the same
  bytes the way Python copies a buffer: the reference;
* ``numpy_copy_mb_s``: ``np.copy`` of the same bytes into a fresh array, for
  honesty (it can be faster or slower than ``bytearray`` depending on the
  allocator and page faults).

MB is 10**6 bytes of the encoded message. ``round_trip_ratio`` is the rate of
one whole encode+sign+verify+decode round relative to the memcpy rate, i.e.
``memcpy_time / (encode_time + decode_time)``. The goal is a round trip at
>= 25% of the memcpy rate: gossiping a model should cost a small multiple of
copying it once.

Then, for 10M float32 values, each tensor codec of ``gossip.compression``
(raw, fp16, int8, top-k) is timed for a whole payload round trip (allocate,
encode, decode) against ``bytearray`` of the same raw float32 bytes,
interleaved so that machine load hits both alike; goal: no codec below 25%
of the memcpy rate. Bytes are reported against raw float32.

Prints rich tables, then one JSON line per model size and one per codec
(``"kind": "codec"``). Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from gossip import NodeKey, Update, decode, encode
from gossip.compression import TensorCodec, resolve_codec
from gossip.layout import ModelLayout

GOAL_RATIO = 0.25
CODECS = ("raw", "fp16", "int8", "topk:0.01", "topk:0.1")


def model(params: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A few named float32 tensors holding exactly ``params`` values, shaped like an MLP."""
    width = 1000
    rows = params // width
    embed_rows = rows // 2
    hidden_rows = (rows * 2) // 5
    out_rows = rows - embed_rows - hidden_rows - 1
    tensors = {
        "embed.weight": (embed_rows, width),
        "fc1.weight": (hidden_rows, width),
        "fc1.bias": (width,),
        "out.weight": (out_rows, width),
    }
    arrays = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in tensors.items()}
    remainder = params - sum(array.size for array in arrays.values())
    if remainder:
        arrays["out.bias"] = rng.standard_normal(remainder, dtype=np.float32)
    return arrays


def best_time(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(params: int, repeats: int, key: NodeKey) -> dict[str, float | int]:
    tensors = model(params, np.random.default_rng(params))
    layout = ModelLayout.of(tensors)
    update = Update(
        sender=key.public_key,
        seq=1,
        samples=1000,
        weight=0.5,
        fingerprint=layout.fingerprint,
        created_at=1_700_000_000.0,
        tensors=tensors,
    )
    message = encode(update, key)
    frozen = bytes(message)
    assert decode(frozen).same_as(update)
    source = np.frombuffer(frozen, dtype=np.uint8)

    encode_s = best_time(lambda: encode(update, key), repeats)
    decode_s = best_time(lambda: decode(frozen), repeats)
    memcpy_s = best_time(lambda: bytearray(frozen), repeats)
    numpy_s = best_time(lambda: np.copy(source), repeats)

    megabytes = len(frozen) / 1e6
    return {
        "params": params,
        "message_bytes": len(frozen),
        "encode_sign_mb_s": round(megabytes / encode_s, 1),
        "verify_decode_mb_s": round(megabytes / decode_s, 1),
        "memcpy_mb_s": round(megabytes / memcpy_s, 1),
        "numpy_copy_mb_s": round(megabytes / numpy_s, 1),
        "round_trip_mb_s": round(megabytes / (encode_s + decode_s), 1),
        "round_trip_ratio": round(memcpy_s / (encode_s + decode_s), 3),
        "encode_ms": round(encode_s * 1e3, 2),
        "decode_ms": round(decode_s * 1e3, 2),
        "repeats": repeats,
    }


def codec_round_trip(tensor_codec: TensorCodec, array: np.ndarray) -> tuple[int, np.ndarray]:
    payload = bytearray(tensor_codec.payload_size(array))
    tensor_codec.encode_into(array, memoryview(payload))
    return len(payload), tensor_codec.decode(memoryview(payload), array.dtype, array.shape)


def measure_codecs(values: int, repeats: int) -> list[dict[str, object]]:
    array = np.random.default_rng(0).standard_normal(values).astype(np.float32)
    raw_bytes = array.tobytes()
    megabytes = len(raw_bytes) / 1e6
    rows = []
    for codec_id in CODECS:
        tensor_codec = resolve_codec(codec_id)
        assert tensor_codec is not None
        size, decoded = codec_round_trip(tensor_codec, array)  # warm up, check the output
        memcpy_s = codec_s = float("inf")
        for _ in range(repeats):  # interleaved: load changes hit both sides alike
            memcpy_s = min(memcpy_s, best_time(lambda: bytearray(raw_bytes), 1))
            codec_s = min(codec_s, best_time(lambda c=tensor_codec: codec_round_trip(c, array), 1))
        rows.append(
            {
                "kind": "codec",
                "codec": codec_id,
                "values": values,
                "mb_s": round(megabytes / codec_s, 1),
                "memcpy_mb_s": round(megabytes / memcpy_s, 1),
                "vs_memcpy": round(memcpy_s / codec_s, 3),
                "bytes_vs_raw": round(size / len(raw_bytes), 4),
                "max_abs_error": float(np.abs(decoded - array).max()),
            }
        )
    return rows


def print_codecs(rows: list[dict[str, object]]) -> None:
    table = Table(
        title="tensor codecs: payload round trip (encode + decode) vs memcpy of the raw bytes",
        caption=f"goal: every codec >= {GOAL_RATIO:.0%} of the memcpy rate",
    )
    for column in ("codec", "MB/s", "memcpy MB/s", "vs memcpy", "bytes vs raw", "max error"):
        table.add_column(column, justify="right")
    for row in rows:
        ratio = float(row["vs_memcpy"])
        style = "green" if ratio >= GOAL_RATIO else "red"
        table.add_row(
            str(row["codec"]),
            f"{row['mb_s']:,.0f}",
            f"{row['memcpy_mb_s']:,.0f}",
            f"[{style}]{ratio:.0%}[/{style}]",
            f"{row['bytes_vs_raw']:.4f}",
            f"{row['max_abs_error']:.3g}",
        )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=15, help="best of this many runs")
    parser.add_argument(
        "--codec-values",
        type=int,
        default=10_000_000,
        help="float32 values for the tensor-codec section",
    )
    args = parser.parse_args()

    key = NodeKey(bytes(range(32)))
    results = [measure(params, args.repeats, key) for params in args.sizes]

    table = Table(
        title=f"gossip.codec vs memcpy, MB/s (best of {args.repeats}; MB = 1e6 bytes)",
        caption=f"ratio = memcpy time / (encode + decode time); goal >= {GOAL_RATIO:.0%}",
    )
    for column in ("params", "MB", "encode+sign", "verify+decode", "memcpy", "np.copy", "ratio"):
        table.add_column(column, justify="right")
    for row in results:
        ratio = row["round_trip_ratio"]
        style = "green" if ratio >= GOAL_RATIO else "red"
        table.add_row(
            f"{row['params'] / 1e6:g}M",
            f"{row['message_bytes'] / 1e6:.1f}",
            f"{row['encode_sign_mb_s']:,.0f}",
            f"{row['verify_decode_mb_s']:,.0f}",
            f"{row['memcpy_mb_s']:,.0f}",
            f"{row['numpy_copy_mb_s']:,.0f}",
            f"[{style}]{ratio:.0%}[/{style}]",
        )
    Console().print(table)
    codec_rows = measure_codecs(args.codec_values, max(3, args.repeats // 2))
    print_codecs(codec_rows)
    for row in results:
        print(json.dumps(row))
    for row in codec_rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
