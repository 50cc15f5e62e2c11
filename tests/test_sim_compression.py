"""Fewer bytes per round in the simulator: gossip's codecs, batched, and convergence with each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fltasks import load_task, partition
from gossip.compression import ErrorFeedback, resolve_codec
from gossip.compression.feedback import round_trip
from topologies.compression import BatchedCodec, Compressor, int8_round_trip
from topologies.graphs import small_world
from topologies.network import NetworkConditions, message_bytes
from topologies.simulator import Simulation, SimulationConfig

pytestmark = pytest.mark.property

DIGITS_LAYOUT = {"0.weight": (64, 64), "0.bias": (64,), "2.weight": (10, 64), "2.bias": (10,)}


def test_int8_and_topk_messages_are_smaller_by_the_promised_factors():
    raw = message_bytes(DIGITS_LAYOUT)
    assert raw / message_bytes(DIGITS_LAYOUT, "int8") >= 3.5
    assert raw / message_bytes(DIGITS_LAYOUT, "fp16") >= 1.9
    assert raw / message_bytes(DIGITS_LAYOUT, "topk:0.01") >= 20


@pytest.mark.parametrize("codec_id", ["fp16", "int8", "topk:0.01", "topk:0.1"])
def test_batched_codec_equals_gossips_decode(codec_id):
    rng = np.random.default_rng(0)
    sizes = [4096, 64, 640, 10, 300]  # 300: a partial int8 block
    stacked = (rng.normal(size=(6, sum(sizes))) * rng.uniform(1e-3, 1e3, size=(6, 1))).astype(
        np.float32
    )
    stacked[2, 4096 : 4096 + 64] = 0.0  # an all-zero tensor (int8: zero scale)
    got = BatchedCodec(resolve_codec(codec_id), sizes).round_trip(torch.from_numpy(stacked))
    codec = resolve_codec(codec_id)
    for row in range(6):
        start = 0
        for size in sizes:
            expected = round_trip(codec, stacked[row, start : start + size])
            np.testing.assert_array_equal(got[row, start : start + size].numpy(), expected)
            start += size


def digits_run(compression: str, rounds: int = 8):
    task = load_task("digits", seed=0)
    graph = small_world(16, 4, 0.1, seed=0)
    shards = partition(task.y_train, 16, "dirichlet:0.5", seed=0)
    config = SimulationConfig(rounds=rounds, local_epochs=2, seed=0, compression=compression)
    simulation = Simulation.for_task(task, graph, shards, config)
    return simulation, simulation.run()


@pytest.mark.parametrize("compression", ["fp16", "int8", "topk:0.01"])
def test_simulator_converges_with_each_codec(compression):
    plain = digits_run("raw")[1]
    simulation, history = digits_run(compression)
    ratio = plain[-1].bytes_per_node / history[-1].bytes_per_node
    assert ratio >= {"fp16": 1.9, "int8": 3.5, "topk:0.01": 20}[compression]
    assert history[-1].accuracy_mean > history[0].accuracy_mean + 0.1
    assert history[-1].consensus_distance < 2 * plain[-1].consensus_distance
    if compression != "topk:0.01":
        assert history[-1].accuracy_mean > plain[-1].accuracy_mean - 0.01


@pytest.mark.parametrize("compression", ["fp16", "int8", "topk:0.01"])
def test_consensus_distance_falls_with_each_codec(compression):
    graph = small_world(16, 4, 0.2, seed=1)
    rng = np.random.default_rng(2)
    estimates, weights = rng.normal(size=(16, 200)), rng.integers(1, 30, size=16).astype(float)
    config = SimulationConfig(rounds=300, train=False, evaluate=False, compression=compression)
    history = Simulation(graph, torch.from_numpy(estimates).float(), weights, config).run()
    # top-k moves 2 of 200 values per message: slower, as expected.
    fall = 1e-1 if compression.startswith("topk") else 1e-3
    assert history[-1].consensus_distance < fall * history[0].consensus_distance


def test_public_copy_gossip_conserves_mass_and_reaches_the_weighted_mean():
    """With full compensation, top-k gossip keeps sum(w z) and agrees on the weighted mean."""
    graph = small_world(12, 4, 0.2, seed=1)
    rng = np.random.default_rng(1)
    estimates, weights = rng.normal(size=(12, 40)), rng.integers(1, 30, size=12).astype(float)
    config = SimulationConfig(
        rounds=400,
        train=False,
        evaluate=False,
        dtype=torch.float64,
        compression="topk:0.1",
        choco_step=0.2,
        choco_compensation=1.0,
    )
    simulation = Simulation(graph, torch.from_numpy(estimates), weights, config)
    simulation.run()
    mass = simulation.weights @ simulation.estimates.numpy()
    np.testing.assert_allclose(mass, weights @ estimates, rtol=1e-9, atol=1e-9)
    weighted_mean = weights @ estimates / weights.sum()
    np.testing.assert_allclose(
        simulation.estimates.numpy(), np.broadcast_to(weighted_mean, (12, 40)), atol=1e-6
    )


def test_topk_refuses_an_unreliable_network():
    with pytest.raises(ValueError, match="loss, delay, churn and push-sample 0"):
        SimulationConfig(compression="topk:0.01", network=NetworkConditions(churn=0.1))


def test_batched_int8_equals_the_codec_on_a_subnormal_block() -> None:
    from gossip.compression import Int8Codec
    from gossip.compression.feedback import round_trip as codec_round_trip

    rows = np.array([[3.78e-43, -1.0e-44, 0.0], [1.0, -2.0, 0.5]], dtype=np.float32)
    batched = int8_round_trip(torch.from_numpy(rows)).numpy()
    for row, got in zip(rows, batched, strict=True):
        assert np.array_equal(got, codec_round_trip(Int8Codec(), row))


# Full float32 range: subnormals, values at +-max, zeros, and ties (a small alphabet repeats).
_EDGE_VALUES = [
    0.0,
    -0.0,
    float(np.finfo(np.float32).smallest_subnormal),
    -float(np.finfo(np.float32).smallest_subnormal),
    1.0e-40,
    float(np.finfo(np.float32).tiny),
    1.0,
    -1.0,
    3.0e38,
    float(np.finfo(np.float32).max),
    -float(np.finfo(np.float32).max),
]
_FLOAT32 = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from(_EDGE_VALUES)
)


def _rows(dtype: type) -> st.SearchStrategy[np.ndarray]:
    shapes = st.tuples(st.integers(1, 3), st.integers(1, 600))  # > 2 int8 blocks per row
    return shapes.flatmap(lambda shape: hnp.arrays(dtype, shape, elements=_FLOAT32))


def _codec_rows(codec_id: str, rows: np.ndarray) -> np.ndarray:
    codec = resolve_codec(codec_id)
    return np.stack([round_trip(codec, row) for row in rows])


@settings(max_examples=200, deadline=None)
@given(rows=st.one_of(_rows(np.float32), _rows(np.float64)))
def test_batched_int8_equals_the_codec_over_the_full_float_range(rows: np.ndarray) -> None:
    batched = BatchedCodec(resolve_codec("int8"), [rows.shape[1]])
    got = batched.round_trip(torch.from_numpy(rows)).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, _codec_rows("int8", rows))


_FLOAT64_BEYOND_FLOAT32 = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([float(np.finfo(np.float64).max), -1e300, 5e-324, -0.0]),
)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.tuples(st.integers(1, 3), st.integers(1, 600)).flatmap(
        lambda shape: hnp.arrays(np.float64, shape, elements=_FLOAT64_BEYOND_FLOAT32)
    )
)
def test_batched_int8_equals_the_codec_for_float64_beyond_float32s_range(rows: np.ndarray) -> None:
    """float64 values past float32's max are clipped to it first, in both forms."""
    got = int8_round_trip(torch.from_numpy(rows)).numpy()
    np.testing.assert_array_equal(got, _codec_rows("int8", rows))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.one_of(_rows(np.float32), _rows(np.float64)),
    fraction=st.sampled_from(["0.01", "0.1", "0.5", "1"]),
)
def test_batched_topk_keeps_the_codecs_values_ties_included(
    rows: np.ndarray, fraction: str
) -> None:
    codec_id = f"topk:{fraction}"
    batched = BatchedCodec(resolve_codec(codec_id), [rows.shape[1]])
    got = batched.round_trip(torch.from_numpy(rows)).numpy()
    expected = _codec_rows(codec_id, rows)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.signbit(got[got == 0]), np.signbit(expected[got == 0]))


def test_int8_block_peaking_at_float32_max_decodes_finite_in_both() -> None:
    row = np.array([[np.finfo(np.float32).max, 1.0, -3.0e38]], dtype=np.float32)
    got = BatchedCodec(resolve_codec("int8"), [3]).round_trip(torch.from_numpy(row)).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, _codec_rows("int8", row))


@pytest.mark.parametrize("codec_id", ["int8", "topk:0.5"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_batched_codecs_refuse_non_finite_values_as_the_codec_does(codec_id: str, bad: float):
    row = np.array([[1.0, bad, 2.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        _codec_rows(codec_id, row)
    with pytest.raises(ValueError, match="NaN or infinite"):
        BatchedCodec(resolve_codec(codec_id), [3]).round_trip(torch.from_numpy(row))


@settings(max_examples=150, deadline=None)
@given(
    rows=st.one_of(_rows(np.float32), _rows(np.float64)),
    codec_id=st.sampled_from(["int8", "fp16"]),
    messages=st.integers(1, 4),
    data=st.data(),
)
def test_batched_error_feedback_is_gossips_for_every_row(
    rows: np.ndarray, codec_id: str, messages: int, data: st.DataObject
) -> None:
    """The simulator's Compressor and one ErrorFeedback per row (the daemon's) send the same
    and keep the same float64 memory, message after message, over the full float range;
    rows outside ``feedback`` (attackers) send plainly and keep no memory."""
    codec = resolve_codec(codec_id)
    n, size = rows.shape
    feedback = data.draw(hnp.arrays(np.bool_, n), label="feedback")
    senders = torch.ones(n, dtype=torch.bool)
    compressor = Compressor(BatchedCodec(codec, [size]), torch.from_numpy(rows))
    per_row = [ErrorFeedback(codec) for _ in range(n)]
    for message in range(messages):
        targets = rows if message % 2 == 0 else -rows
        try:
            with np.errstate(over="ignore"):
                expected = np.stack(
                    [
                        per_row[i].compress(targets[i]) if feedback[i] else round_trip(codec, row)
                        for i, row in enumerate(targets)
                    ]
                )
        except ValueError:  # a sum past float32's max casts to inf: both refuse it
            with pytest.raises(ValueError, match="NaN or infinite"), np.errstate(over="ignore"):
                compressor.encode(torch.from_numpy(targets), senders, torch.from_numpy(feedback))
            return
        with np.errstate(over="ignore"):
            got = compressor.encode(
                torch.from_numpy(targets), senders, torch.from_numpy(feedback)
            ).numpy()
        np.testing.assert_array_equal(got, expected)
        assert compressor.memory is not None and compressor.memory.dtype == torch.float64
        for i in range(n):
            memory = per_row[i].memory if feedback[i] else np.zeros(size)
            np.testing.assert_array_equal(compressor.memory[i].numpy(), memory)
