"""Checkpoints: atomic replacement, the previous file as fallback, and corruption detected."""

from __future__ import annotations

import os
import pickle
import resource
import stat
from pathlib import Path

import blake3
import msgpack
import numpy as np
import pytest

from p2pfl.checkpoint import (
    MAGIC,
    CheckpointError,
    CheckpointStore,
    NodeState,
    decode_state,
    encode_state,
)

pytestmark = pytest.mark.unit

FINGERPRINT = bytes(range(32))
PEER = "12D3KooWJbV6uzPMKBPtwhgUXm8FnTnosy4gawhgjCLP6PdDPsdC"


def state(round_: int) -> NodeState:
    return NodeState(
        round=round_,
        seq=round_ * 2,
        weight=0.25 + round_,
        estimate=np.linspace(-1.0, 1.0, 97) * (round_ + 1),
        fingerprint=FINGERPRINT,
        last_seq={bytes([round_]) * 32: 7, b"\xff" * 32: 3},
        peers={PEER: [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"]},
        privacy={"dp_steps": 3},
    )


def assert_same_state(got: NodeState | None, want: NodeState) -> None:
    assert got is not None
    assert (got.round, got.seq, got.weight) == (want.round, want.seq, want.weight)
    assert got.estimate.dtype == np.float64
    np.testing.assert_array_equal(got.estimate, want.estimate)
    assert got.fingerprint == want.fingerprint
    assert got.last_seq == want.last_seq
    assert got.peers == want.peers
    assert got.privacy == want.privacy


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_load_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state")
    store.save(state(3))
    assert_same_state(store.load(FINGERPRINT), state(3))


def test_fresh_state_dir_loads_nothing(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "empty").load(FINGERPRINT) is None


def test_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    assert_same_state(decode_state(store.current.read_bytes()), state(2))
    assert_same_state(decode_state(store.previous.read_bytes()), state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [store.current.name, store.previous.name]
    )


def test_a_write_that_fails_midway_leaves_the_current_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))

    def disk_failure(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("p2pfl.checkpoint.os.fsync", disk_failure)
    with pytest.raises(OSError):
        store.save(state(2))
    monkeypatch.undo()
    assert_same_state(store.load(FINGERPRINT), state(1))


@pytest.mark.parametrize("where", ["magic", "digest", "body", "last byte"])
def test_flipped_byte_in_current_falls_back_to_previous(tmp_path: Path, where: str) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    size = store.current.stat().st_size
    flip_byte(store.current, {"magic": 0, "digest": 10, "body": 60, "last byte": size - 1}[where])
    assert_same_state(store.load(FINGERPRINT), state(1))


def test_truncated_current_falls_back_to_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    data = store.current.read_bytes()
    store.current.write_bytes(data[: len(data) // 2])
    assert_same_state(store.load(FINGERPRINT), state(1))


def test_both_corrupt_is_a_checkpoint_error_naming_both_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    flip_byte(store.current, 50)
    store.previous.write_bytes(store.previous.read_bytes()[:20])
    with pytest.raises(CheckpointError) as caught:
        store.load(FINGERPRINT)
    message = str(caught.value)
    assert store.current.name in message and store.previous.name in message
    assert "\n" not in message


def test_checkpoint_of_another_model_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    with pytest.raises(CheckpointError, match="different model") as caught:
        store.load(bytes(32))
    assert "--state-dir" in str(caught.value)


def test_file_is_magic_digest_msgpack_not_pickle(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    data = store.current.read_bytes()
    assert data.startswith(MAGIC) and MAGIC == b"P2CK"
    body = data[36:]
    # A pickle (protocol >= 2) starts with the PROTO opcode 0x80; a msgpack map with 0x8X.
    assert body[:1] != b"\x80"


class _Planted:
    """Unpickling this would create the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (self.marker.touch, ())


def test_a_pickle_with_a_valid_digest_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    body = pickle.dumps(_Planted(marker))
    forged = MAGIC + blake3.blake3(body).digest() + body
    store = CheckpointStore(tmp_path / "state")
    store.directory.mkdir()
    store.current.write_bytes(forged)
    with pytest.raises(CheckpointError):
        store.load(FINGERPRINT)
    assert not marker.exists()


def test_encode_is_deterministic_and_decodes_back() -> None:
    encoded = encode_state(state(5))
    assert encode_state(state(5)) == encoded
    assert_same_state(decode_state(encoded), state(5))


def test_a_state_dir_in_use_by_another_store_is_refused_in_one_line(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path)
    first.lock()
    with pytest.raises(CheckpointError, match="in use by another node") as refused:
        CheckpointStore(tmp_path).lock()
    assert "\n" not in str(refused.value)
    first.unlock()
    CheckpointStore(tmp_path).lock()  # free again once the holder lets go


# -- forged, hostile or failing storage ---------------------------------------------------


def forge(**fields: object) -> bytes:
    """A checkpoint of state(2) with ``fields`` replaced in its body and a valid digest."""
    body = msgpack.unpackb(encode_state(state(2))[36:], raw=False, strict_map_key=False)
    body.update(fields)
    packed = msgpack.packb(body, use_bin_type=True)
    return MAGIC + blake3.blake3(packed).digest() + packed


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"weight": float("nan")}, "weight"),
        ({"weight": 0.0}, "weight"),
        ({"estimate": np.ones(1).tobytes()}, "97"),
        ({"estimate": np.full(97, np.inf).tobytes()}, "infinite"),
        ({"round": 2**62}, "round"),
        ({"seq": -1}, "seq"),
        ({"last_seq": [[b"\x01" * 32, 2**63 - 1]]}, "last_seq"),
        ({"last_seq": [[b"\x01" * 32, 1]] * 70_000}, "last_seq"),
        ({"peers": {"p": ["x" * 300]}}, "peers"),
        ({"privacy": {1: 2}}, "privacy"),
    ],
)
def test_a_forged_checkpoint_is_refused_in_one_line_and_the_previous_one_used(
    tmp_path: Path, fields: dict[str, object], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    store.current.write_bytes(forge(**fields))
    with pytest.raises(CheckpointError, match=named) as refused:
        decode_state(store.current.read_bytes(), expected_length=97)
    assert "\n" not in str(refused.value)
    assert_same_state(store.load(FINGERPRINT, expected_length=97), state(1))
    messages = [record.getMessage() for record in caplog.records]
    warning = next(message for message in messages if "ignoring checkpoint" in message)
    assert store.previous.name in warning and "\n" not in warning


def test_a_checkpoint_from_before_the_privacy_rename_still_resumes() -> None:
    """Older checkpoints keep the privacy budget under the key "optimizer"."""
    body = msgpack.unpackb(encode_state(state(2))[36:], raw=False, strict_map_key=False)
    body["optimizer"] = body.pop("privacy")
    packed = msgpack.packb(body, use_bin_type=True)
    older = MAGIC + blake3.blake3(packed).digest() + packed
    assert_same_state(decode_state(older, expected_length=97), state(2))


def test_files_are_private_and_the_directory_too(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state")
    store.save(state(1))
    store.save(state(2))
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    for path in (store.current, store.previous):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_planted_symlink_at_the_old_temporary_name_is_never_written_through(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path / "state")
    store.save(state(1))
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    # The name the store used to write to, predictable from the pid.
    (store.directory / f"checkpoint.p2ck.tmp-{os.getpid()}").symlink_to(victim)
    store.save(state(2))
    assert victim.read_bytes() == b"keep me"
    assert_same_state(store.load(FINGERPRINT), state(2))


def test_out_of_file_descriptors_is_counted_and_keeps_the_last_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The kernel hands out the lowest free descriptor: cap the limit right there.
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        written = store.try_save(state(2))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert written is False
    assert store.failures == {"EMFILE": 1}
    assert any("checkpoint not written (EMFILE" in r.getMessage() for r in caplog.records)
    assert_same_state(store.load(FINGERPRINT), state(1))
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
