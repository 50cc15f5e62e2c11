"""The one live answer to "who is a member" (p2pfl/member_source.py) and the members
protocol's messages and service rules (p2pfl/member_service.py), without a network."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossip.keys import NodeKey
from gossip.member_formats import (
    Certificate,
    Genesis,
    MemberFormatError,
    RevocationEntry,
    armor,
)
from p2pfl.gating import ConnectionGate
from p2pfl.member_service import MemberService, decode_message, encode_message
from p2pfl.member_source import MemberSource
from p2pfl.member_store import inbox

pytestmark = pytest.mark.integration

NOW = 1_700_000_000
KEYS = [NodeKey(bytes([i + 1]) * 32) for i in range(6)]
IDS = [k.peer_id for k in KEYS]


def test_the_source_is_live_for_every_reader() -> None:
    source = MemberSource(IDS[:2])
    keys = source.keys
    changes = []
    source.subscribe(lambda added, removed: changes.append((added, removed)))
    assert IDS[2] not in source and KEYS[2].public_key not in keys
    source.update(IDS[:3])
    assert IDS[2] in source and KEYS[2].public_key in keys
    source.update(IDS[:3], revoked=[IDS[0]])
    assert IDS[0] not in source and source.is_revoked(IDS[0])
    assert KEYS[0].public_key in source.revoked_keys
    assert changes == [({IDS[2]}, frozenset()), (frozenset(), {IDS[0]})]


def test_the_gate_protects_members_as_they_come_and_go() -> None:
    source = MemberSource(IDS[:1])
    gate = ConnectionGate(source)
    assert gate.manager.is_protected(IDS[0])
    source.update(IDS[1:2])
    assert gate.manager.is_protected(IDS[1]) and not gate.manager.is_protected(IDS[0])


def service(tmp_path: Path, clock=lambda: NOW) -> MemberService:
    genesis = Genesis.create("t", IDS[:4], 2)
    return MemberService(genesis, None, IDS[0], str(tmp_path), print, clock=clock)


def entry_for(members, target: str, *signers: NodeKey) -> RevocationEntry:
    entry = RevocationEntry(sigs=(), network=members.network_id, seq=members.head.length,
                            prev=members.head.head, kind="peer", target=target,
                            effective=NOW, issued=NOW)
    for key in signers:
        entry = entry.signed_by(key)
    return entry


def test_a_behind_peer_catches_up_and_an_old_log_is_refused(tmp_path: Path) -> None:
    ahead, behind = service(tmp_path / "a"), service(tmp_path / "b")
    assert ahead.members.extend_log([entry_for(ahead.members, IDS[3], *KEYS[:2])], NOW) == 1
    # behind asks with its head; ahead answers with what behind lacks
    request = decode_message(encode_message(behind.members, behind.members.head.length))
    start = ahead._behind_at(request)
    assert start == 0
    assert behind.absorb(decode_message(encode_message(ahead.members, start)))
    assert behind.members.head == ahead.members.head
    assert IDS[3] not in behind.source and behind.source.is_revoked(IDS[3])
    # a replay of the empty log changes nothing
    assert not ahead.absorb(decode_message(encode_message(service(tmp_path / "c").members, 0)))
    assert ahead.members.head.length == 1


def test_the_log_survives_a_restart(tmp_path: Path) -> None:
    first = service(tmp_path)
    first.members.extend_log([entry_for(first.members, IDS[3], *KEYS[:2])], NOW)
    first._changed()
    assert service(tmp_path).members.head == first.members.head


def test_the_inbox_takes_good_files_and_marks_bad_ones(tmp_path: Path) -> None:
    node = service(tmp_path)
    cert = Certificate(sigs=(), network=node.members.network_id, peer=IDS[4], org="o",
                       serial=9, not_before=NOW - 1, not_after=NOW + 1000)
    inbox(tmp_path).mkdir()
    (inbox(tmp_path) / "a.certificate").write_text(armor(cert.signed_by(KEYS[0])))
    both = cert.signed_by(KEYS[0]).signed_by(KEYS[1])
    (inbox(tmp_path) / "b.certificate").write_text(armor(both))
    assert node.take_inbox() == 1
    assert IDS[4] in node.source
    assert [p.name for p in inbox(tmp_path).iterdir()] == ["a.certificate.refused"]


def test_an_expired_member_lapses_on_the_clock(tmp_path: Path) -> None:
    now = [NOW]
    node = service(tmp_path, clock=lambda: now[0])
    cert = Certificate(sigs=(), network=node.members.network_id, peer=IDS[4], org="o",
                       serial=9, not_before=NOW - 1, not_after=NOW + 10)
    node.members.add_certificate(cert.signed_by(KEYS[0]).signed_by(KEYS[1]), NOW)
    node.refresh()
    assert IDS[4] in node.source
    now[0] = NOW + 10
    node.refresh()
    assert IDS[4] not in node.source


@pytest.mark.parametrize("data", [b"", b"\x80", b"\x81\xa1x\x01", b"\xc1" * 10])
def test_malformed_messages_are_one_line_errors(data: bytes) -> None:
    with pytest.raises(MemberFormatError) as raised:
        decode_message(data)
    assert "\n" not in str(raised.value)
