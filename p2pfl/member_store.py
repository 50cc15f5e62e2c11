"""Membership files on disk: the genesis and certificate files, the node's membership
state (known certificates and the revocation log) and its inbox.

``<state-dir>/membership`` holds canonical msgpack ``{"certs": [bytes], "log": [bytes]}``,
written atomically (temp file, fsync, rename), so a restart keeps every revocation it
had: an older log can never come back from disk. ``<state-dir>/membership-inbox/`` is
where ``p2pfl member publish`` drops a certificate or a revocation entry for a running
node, which takes it within a second (p2pfl/member_service.py) and deletes the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from gossip.member_formats import (
    Certificate,
    Genesis,
    MemberFormatError,
    MembershipObject,
    RevocationEntry,
    canonical,
    dearmor,
    decode_canonical,
)
from gossip.membership import MAX_CERTIFICATES, MAX_LOG_ENTRIES, MemberSet

STATE_FILE = "membership"
INBOX_DIR = "membership-inbox"
MAX_STATE_BYTES = 64 * 1024 * 1024


class MemberFileError(ValueError):
    """A membership file that cannot be used; the message is one line naming it."""


def read_object(path: str | os.PathLike[str], expected: type | None = None) -> MembershipObject:
    """A genesis, certificate or revocation file; MemberFileError names what is wrong."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MemberFileError(f"{source} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MemberFileError(f"cannot read {source}: {error}") from None
    try:
        return dearmor(text, expected)
    except MemberFormatError as error:
        raise MemberFileError(f"{source}: {error}") from None


def read_genesis(path: str | os.PathLike[str]) -> Genesis:
    item = read_object(path, Genesis)
    assert isinstance(item, Genesis)
    return item


def write_atomically(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_state(members: MemberSet, state_dir: str | os.PathLike[str]) -> None:
    data = canonical({
        "certs": [cert.encode() for cert in members.certificates()],
        "log": [entry.encode() for entry in members.log],
    })
    write_atomically(Path(state_dir) / STATE_FILE, data)


def load_state(members: MemberSet, state_dir: str | os.PathLike[str], now: int) -> int:
    """Fill ``members`` from the state file, if any; returns the entries loaded.

    Everything is verified again, as if a peer had sent it: the log first (its
    entries need only the certificates of their signers, which the certificates
    below re-add), then the certificates, several passes so that one signed by a
    member whose certificate comes later in the file still counts."""
    path = Path(state_dir) / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise MemberFileError(f"cannot read {path}: {error.strerror}") from None
    if len(raw) > MAX_STATE_BYTES:
        raise MemberFileError(f"{path}: larger than {MAX_STATE_BYTES} bytes")
    try:
        import msgpack  # the state holds thousands of items; its own bounds, not the object's

        state = msgpack.unpackb(raw, raw=False, max_array_len=MAX_CERTIFICATES + MAX_LOG_ENTRIES)
        certs = [Certificate.decode(item) for item in state["certs"]]
        entries = [RevocationEntry.decode(item) for item in state["log"]]
    except (MemberFormatError, KeyError, TypeError, ValueError) as error:
        raise MemberFileError(
            f"{path} is corrupt ({error}); move it away to start afresh"
        ) from None
    add_certificates(members, certs, now)
    if entries:
        members.extend_log(entries, now)
    add_certificates(members, certs, now)
    members.refused.clear()  # our own file's retries are no peer's refusals
    return members.head.length


def add_certificates(members: MemberSet, certs: list[Certificate], now: int) -> int:
    """Add ``certs`` in whatever order: retry the refused while any pass adds one.

    Copies are dropped first: a peer repeating one certificate a thousand times in a
    message costs one check, not a thousand (each check verifies signatures)."""
    unique = {(cert.body_hash, cert.sigs): cert for cert in certs}
    pending, added = list(unique.values()), 0
    while pending:
        refused = [cert for cert in pending if members.add_certificate(cert, now) is not None]
        if len(refused) == len(pending):
            break
        added += len(pending) - len(refused)
        pending = refused
    return added


def inbox(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / INBOX_DIR


def decode_any(data: bytes) -> MembershipObject:
    """A certificate or an entry from its raw canonical bytes (the wire form)."""
    value = decode_canonical(data, "membership object")
    body = value.get("body") if isinstance(value, dict) else None
    if isinstance(body, dict) and "target" in body:
        return RevocationEntry.decode(data)
    return Certificate.decode(data)
