"""The membership core (gossip/membership.py): every refusal issue 22 lists, counted."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from gossip.keys import NodeKey
from gossip.member_formats import (
    Certificate,
    Genesis,
    MemberFormatError,
    RevocationEntry,
    armor,
    canonical,
    dearmor,
)
from gossip.membership import MemberSet, Refusal, Refused, expiry_warning

pytestmark = pytest.mark.unit

NOW = 1_700_000_000
DAY = 86_400


def keys(n: int) -> list[NodeKey]:
    return [NodeKey(bytes([i + 1]) * 32) for i in range(n)]


@pytest.fixture
def founders() -> list[NodeKey]:
    return keys(4)


@pytest.fixture
def members(founders: list[NodeKey]) -> MemberSet:
    return MemberSet(Genesis.create("hospitals", [k.peer_id for k in founders], 2))


def invitation(members: MemberSet, peer: NodeKey, serial: int = 7, days: int = 30) -> Certificate:
    return Certificate(
        sigs=(), network=members.network_id, peer=peer.peer_id, org="clinic",
        serial=serial, not_before=NOW - 60, not_after=NOW + days * DAY,
    )


def signed(item, *signers: NodeKey):
    for key in signers:
        item = item.signed_by(key)
    return item


def revocation(members: MemberSet, kind: str, target, *signers: NodeKey, at: int = NOW):
    entry = RevocationEntry(
        sigs=(), network=members.network_id, seq=members.head.length, prev=members.head.head,
        kind=kind, target=target, effective=at, issued=at,
    )
    return signed(entry, *signers)


def test_a_certificate_with_k_signatures_makes_a_member(members, founders) -> None:
    newcomer = keys(5)[4]
    cert = signed(invitation(members, newcomer), *founders[:2])
    assert members.add_certificate(cert, NOW) is None
    assert members.is_member(newcomer.peer_id, NOW)
    assert members.members(NOW) == {k.peer_id for k in keys(5)}


def test_k_minus_one_signatures_are_refused_and_counted(members, founders) -> None:
    newcomer = keys(5)[4]
    refused = members.add_certificate(signed(invitation(members, newcomer), founders[0]), NOW)
    assert isinstance(refused, Refused) and refused.reason == Refusal.TOO_FEW_SIGNATURES
    assert members.refused["too-few-signatures"] == 1
    assert not members.is_member(newcomer.peer_id, NOW)


def test_one_member_signing_twice_is_refused(members, founders) -> None:
    cert = signed(invitation(members, keys(5)[4]), founders[0], founders[0])
    refused = members.add_certificate(cert, NOW)
    assert refused.reason == Refusal.DUPLICATE_SIGNER
    assert members.refused["duplicate-signer"] == 1


def test_a_signature_by_a_revoked_member_does_not_count(members, founders) -> None:
    entry = revocation(members, "peer", founders[3].peer_id, founders[0], founders[1])
    assert members.extend_log([entry], NOW) == 1
    cert = signed(invitation(members, keys(5)[4]), founders[2], founders[3])
    assert members.add_certificate(cert, NOW + 1).reason == Refusal.SIGNER_NOT_MEMBER
    assert members.refused["signer-not-member"] == 1


def test_a_signature_by_an_expired_member_does_not_count(members, founders) -> None:
    fifth, sixth = keys(6)[4:]
    short = signed(invitation(members, fifth, days=1), *founders[:2])
    assert members.add_certificate(short, NOW) is None
    later = NOW + 2 * DAY
    assert not members.is_member(fifth.peer_id, later)
    cert = replace(invitation(members, sixth), not_before=later - 60)
    refused = members.add_certificate(signed(cert, founders[0], fifth), later)
    assert refused.reason == Refusal.SIGNER_NOT_MEMBER


def test_a_certificate_for_another_network_is_refused(members, founders) -> None:
    other = Genesis.create("banks", [k.peer_id for k in founders], 2)
    cert = replace(invitation(members, keys(5)[4]), network=other.network_id)
    refused = members.add_certificate(signed(cert, *founders[:2]), NOW)
    assert refused.reason == Refusal.WRONG_NETWORK
    assert members.refused["wrong-network"] == 1


def test_an_altered_certificate_is_refused(members, founders) -> None:
    cert = signed(invitation(members, keys(5)[4]), *founders[:2])
    longer = replace(cert, not_after=cert.not_after + 365 * DAY)  # same signatures
    assert members.add_certificate(longer, NOW).reason == Refusal.BAD_SIGNATURE
    forged = replace(cert, sigs=((founders[2].peer_id, cert.sigs[0][1]), cert.sigs[1]))
    assert members.add_certificate(forged, NOW).reason == Refusal.BAD_SIGNATURE
    assert members.refused["bad-signature"] == 2


def test_altered_bytes_of_a_certificate_never_verify(members, founders) -> None:
    data = bytearray(signed(invitation(members, keys(5)[4]), *founders[:2]).encode())
    refused = 0
    for index in range(len(data)):
        flipped = bytes(data[:index]) + bytes([data[index] ^ 0x01]) + bytes(data[index + 1 :])
        result = members.add_encoded_certificate(flipped, NOW)
        refused += isinstance(result, Refused)
    assert refused == len(data)
    assert set(members.refused) <= {"malformed", "bad-signature", "wrong-network"}


def test_an_expired_certificate_is_refused(members, founders) -> None:
    cert = signed(invitation(members, keys(5)[4], days=1), *founders[:2])
    assert members.add_certificate(cert, NOW + 2 * DAY).reason == Refusal.EXPIRED
    assert members.refused["expired"] == 1


def test_an_expired_certificate_lapses_without_any_message(members, founders) -> None:
    newcomer = keys(5)[4]
    members.add_certificate(signed(invitation(members, newcomer, days=1), *founders[:2]), NOW)
    assert members.is_member(newcomer.peer_id, NOW + DAY - 1)
    assert not members.is_member(newcomer.peer_id, NOW + DAY)


def test_revoking_a_key_and_a_serial(members, founders) -> None:
    fifth, sixth = keys(6)[4:]
    members.add_certificate(signed(invitation(members, fifth, serial=5), *founders[:2]), NOW)
    members.add_certificate(signed(invitation(members, sixth, serial=6), *founders[:2]), NOW)
    by_key = revocation(members, "peer", fifth.peer_id, *founders[:2], at=NOW + 10)
    members.extend_log([by_key], NOW)
    members.extend_log([revocation(members, "serial", 6, *founders[2:], at=NOW + 10)], NOW)
    assert members.is_member(fifth.peer_id, NOW + 9)
    assert not members.is_member(fifth.peer_id, NOW + 10)
    assert not members.is_member(sixth.peer_id, NOW + 10)
    assert members.revoked_peers(NOW + 10) == {fifth.peer_id}
    renewed = signed(invitation(members, sixth, serial=61), *founders[:2])
    assert members.add_certificate(renewed, NOW + 11) is None  # a new serial is a new cert
    again = signed(invitation(members, fifth, serial=51), *founders[:2])
    assert members.add_certificate(again, NOW + 11).reason == Refusal.REVOKED


def test_a_revocation_needs_k_members(members, founders) -> None:
    entry = revocation(members, "peer", founders[3].peer_id, founders[0])
    assert members.extend_log([entry], NOW).reason == Refusal.TOO_FEW_SIGNATURES
    assert members.head.length == 0
    assert members.is_member(founders[3].peer_id, NOW)


def test_a_replayed_older_log_changes_nothing(members, founders) -> None:
    first = revocation(members, "peer", founders[3].peer_id, *founders[:2])
    members.extend_log([first], NOW)
    second = revocation(members, "peer", founders[2].peer_id, *founders[:2])
    members.extend_log([second], NOW)
    older = MemberSet(members.genesis)
    older.extend_log([first], NOW)
    refused = members.extend_log(older.log, NOW)
    assert refused.reason == Refusal.STALE_LOG
    assert members.refused["stale-log"] == 1
    assert members.head.length == 2
    assert not members.is_member(founders[2].peer_id, NOW)


def test_a_forked_log_is_refused(members, founders) -> None:
    members.extend_log([revocation(members, "peer", founders[3].peer_id, *founders[:2])], NOW)
    rival = MemberSet(members.genesis)
    rival.extend_log([revocation(rival, "peer", founders[2].peer_id, *founders[:2])], NOW)
    assert members.extend_log(rival.log, NOW).reason == Refusal.LOG_FORK
    assert members.is_member(founders[2].peer_id, NOW)


def test_a_lagging_node_catches_up_from_a_log_and_a_suffix(members, founders) -> None:
    entries = []
    for victim in founders[2:]:
        entry = revocation(members, "peer", victim.peer_id, *founders[:2])
        members.extend_log([entry], NOW)
        entries.append(entry)
    behind = MemberSet(members.genesis)
    assert behind.extend_log(entries[:1], NOW) == 1
    assert behind.extend_log(entries[1:], NOW) == 1
    assert behind.head == members.head
    gap = MemberSet(members.genesis)
    assert gap.extend_log(entries[1:], NOW).reason == Refusal.LOG_GAP


def test_an_entry_from_the_future_or_out_of_order_is_refused(members, founders) -> None:
    late = revocation(members, "peer", founders[3].peer_id, *founders[:2], at=NOW + 3600)
    assert members.extend_log([late], NOW).reason == Refusal.BAD_TIME


def test_certificates_cannot_vouch_for_each_other_in_a_circle(members, founders) -> None:
    a, b = keys(6)[4:]
    members._certs[a.peer_id] = {b"x": signed(invitation(members, a), b, founders[0])}
    members._certs[b.peer_id] = {b"y": signed(invitation(members, b), a, founders[0])}
    assert not members.is_member(a.peer_id, NOW) and not members.is_member(b.peer_id, NOW)


def test_the_last_third_of_a_certificate_warns(members) -> None:
    cert = invitation(members, keys(5)[4], days=30)
    life = cert.not_after - cert.not_before
    assert not expiry_warning(cert, cert.not_after - life // 3 - 1)
    assert expiry_warning(cert, cert.not_after - life // 3)


def test_files_round_trip_and_refuse_other_kinds(members, founders) -> None:
    cert = signed(invitation(members, keys(5)[4]), founders[0])
    assert dearmor(armor(cert), Certificate) == cert
    assert dearmor(armor(members.genesis), Genesis) == members.genesis
    with pytest.raises(MemberFormatError, match="expected a certificate"):
        dearmor(armor(members.genesis), Certificate)
    with pytest.raises(MemberFormatError, match="not valid base64"):
        dearmor("-----BEGIN P2PFL GENESIS-----\n!!\n-----END P2PFL GENESIS-----")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb({"body": {}, "sigs": []}),
        msgpack.packb({"sigs": [], "body": {}}),  # keys out of order: not canonical
        canonical({"body": {"v": 1.0}, "sigs": []}),
        msgpack.packb(msgpack.ExtType(1, b"x")),
        canonical([1] * 2000),
    ],
)
def test_malformed_bytes_are_one_line_errors(data: bytes) -> None:
    with pytest.raises(MemberFormatError) as raised:
        Certificate.decode(data)
    assert "\n" not in str(raised.value)


def test_genesis_rules() -> None:
    ids = [k.peer_id for k in keys(3)]
    with pytest.raises(MemberFormatError, match="threshold"):
        Genesis.create("net", ids, 4)
    with pytest.raises(MemberFormatError, match="ed25519 peer id"):
        Genesis.create("net", ["nope"], 1)
    reordered = Genesis.create("net", ids[::-1], 2)
    assert reordered.network_id == Genesis.create("net", ids, 2).network_id


def test_strangers_signatures_are_not_verified_beyond_the_first(members, founders) -> None:
    """A certificate signed by 64 throwaway keys, sent by anyone: only the signatures that
    can count are checked (members', and one stranger's to tell an altered id from a
    stranger). Here all but the first stranger's signatures are garbage, and the verdict
    is signer-not-member: the garbage was never verified (verifying all 64 is the cost
    an outsider could make a node pay per copy, on its event loop)."""
    throwaway = [NodeKey(bytes([200]) + bytes([i]) * 31) for i in range(64)]
    cert = signed(invitation(members, keys(6)[5]), throwaway[0])
    garbage = tuple((key.peer_id, bytes(64)) for key in throwaway[1:])
    cert = replace(cert, sigs=cert.sigs + garbage)
    assert members.add_certificate(cert, NOW).reason == Refusal.SIGNER_NOT_MEMBER


def test_copies_of_one_certificate_in_a_message_are_checked_once(members, founders) -> None:
    from p2pfl.member_store import add_certificates

    stranger_signed = signed(invitation(members, keys(6)[5]), NodeKey(bytes([201]) * 32))
    assert add_certificates(members, [stranger_signed] * 1000, NOW) == 0
    assert members.refused["signer-not-member"] == 1
