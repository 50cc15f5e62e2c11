"""The vocabulary agreement on real libp2p hosts in this process (p2pfl/vocabulary.py):
a late member adopts a running network's frozen union, and a non-member cannot add
to anyone's union when membership applies."""

from __future__ import annotations

import dataclasses
import logging
import socket
from pathlib import Path

import pytest
import trio

from gossip.keys import NodeKey
from gossip.vocabulary import (
    MAX_VOCABULARY_MESSAGE_BYTES,
    Message,
    Vocabulary,
    VocabularyState,
    encode,
)
from p2pfl import vocabulary
from p2pfl.cli import main
from p2pfl.config import NodeConfig, build_config
from p2pfl.member_source import MemberSource
from p2pfl.member_store import write_atomically
from p2pfl.protocols import VOCABULARY_PROTOCOL
from p2pfl.transport import Transport
from p2pfl.vocabulary import (
    VOCABULARY_FILE,
    _phase,
    agree_vocabulary,
    local_state,
    serve_frozen,
)
from tests.attackers import seeded_keys

pytestmark = pytest.mark.integration

NETWORK = Vocabulary({"smoker": frozenset({"current", "never"})},
                     frozenset({"healthy", "sick"}))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _member_config(tmp_path: Path, bootstrap: str) -> NodeConfig:
    path = tmp_path / "late.csv"
    path.write_text("age,smoker,outcome\n30,former,healthy\n41,never,sick\n52,never,sick\n")
    return build_config({"task": f"csv:{path}", "label": "outcome", "bootstrap": (bootstrap,),
                         "vocabulary_wait": 1.0, "state_dir": str(tmp_path / "state")}, {})


async def test_a_late_member_adopts_the_running_networks_frozen_union(tmp_path: Path) -> None:
    async with Transport.open(NodeKey.generate()) as running:
        config = _member_config(tmp_path, running.addrs[0])
        late = local_state(config)
        frozen = VocabularyState(NETWORK, late.fingerprint, late.columns, "outcome")
        frozen.freeze()
        running.set_handler(VOCABULARY_PROTOCOL, serve_frozen(frozen, None),
                            MAX_VOCABULARY_MESSAGE_BYTES, 2.0)
        _, peers = await _phase(config, NodeKey.generate(), late)
    assert peers == 1 and late.adopted
    assert late.union == NETWORK  # its "former" smokers are not added: the union is frozen
    assert frozen.union == NETWORK and frozen.served == 1


async def test_a_non_member_adds_nothing_to_a_members_union(tmp_path: Path) -> None:
    member = NodeKey.generate()
    members = MemberSource({member.peer_id, NodeKey.generate().peer_id})
    async with Transport.open(member, allowed_peers=members) as serving:
        config = _member_config(tmp_path, serving.addrs[0])
        stranger = local_state(config)
        state = VocabularyState(NETWORK, stranger.fingerprint, stranger.columns, "outcome")
        serving.set_handler(VOCABULARY_PROTOCOL, serve_frozen(state, members),
                            MAX_VOCABULARY_MESSAGE_BYTES, 2.0)
        _, peers = await _phase(config, NodeKey.generate(), stranger)
    assert peers == 0 and stranger.answers == 0
    assert state.union == NETWORK


async def test_the_handler_refuses_a_non_member_in_one_counted_line() -> None:
    state = VocabularyState(NETWORK, bytes(32), ("smoker",), "outcome")
    handle = serve_frozen(state, MemberSource({NodeKey.generate().peer_id}))
    reply = await handle(NodeKey.generate().peer_id, state.request())
    assert reply == b"refused: not a member of this network"
    assert state.refused == 1 and state.served == 0


def test_a_restarted_node_builds_over_the_union_it_saved_without_asking(tmp_path: Path) -> None:
    path = tmp_path / "alone.csv"
    path.write_text("age,smoker,outcome\n30,former,healthy\n41,never,sick\n52,never,sick\n")
    config = build_config({"task": f"csv:{path}", "label": "outcome", "min_neighbours": 0,
                           "state_dir": str(tmp_path / "state")}, {})
    key = NodeKey.generate()
    first = agree_vocabulary(config, key)
    assert not first.restored and first.state.frozen
    port = first.listen[0].rsplit("/", 1)[1]
    assert port != "0" and first.listen[0].startswith("/ip4/127.0.0.1/tcp/")
    assert (tmp_path / "state" / VOCABULARY_FILE).exists()
    # The network's union had grown before the restart: the saved one wins over the file.
    local = local_state(config)
    own = local.own
    write_atomically(tmp_path / "state" / VOCABULARY_FILE,
                     encode(Message(local.fingerprint, own.union(NETWORK), frozen=True)))
    again = agree_vocabulary(config, key)
    assert again.restored and again.state.union == own.union(NETWORK)
    assert again.for_task() == (("healthy", "sick"), {"smoker": ("current", "former", "never")})


async def test_a_certified_newcomer_shows_its_certificate_then_contributes(
    tmp_path: Path,
) -> None:
    ids = seeded_keys(tmp_path, 3, "vocabulary-network")
    keys = [NodeKey.load(tmp_path / f"node-{i}" / "node.key") for i in range(3)]
    genesis, cert = tmp_path / "genesis", tmp_path / "cert"
    assert main(["network", "create", str(genesis), "--name", "v", "--threshold", "2",
                 f"--founder={ids[0]}", f"--founder={ids[1]}"]) == 0
    sign = ["member", "sign", str(cert), "--network", str(genesis)]
    assert main([*sign, "--key", str(tmp_path / "node-0" / "node.key"), "--peer", ids[2],
                 "--org", "three"]) == 0
    assert main([*sign, "--key", str(tmp_path / "node-1" / "node.key")]) == 0
    founder_csv, newcomer_csv = tmp_path / "founder.csv", tmp_path / "newcomer.csv"
    founder_csv.write_text("smoker,outcome\nnever,healthy\ncurrent,sick\n")
    newcomer_csv.write_text("smoker,outcome\nformer,healthy\nnever,sick\n")
    port = _free_port()
    founder = build_config({
        "task": f"csv:{founder_csv}", "label": "outcome", "network": str(genesis),
        "listen": (f"/ip4/127.0.0.1/tcp/{port}",), "vocabulary_wait": 60.0,
        "state_dir": str(tmp_path / "founder-state")}, {})
    newcomer = build_config({
        "task": f"csv:{newcomer_csv}", "label": "outcome", "network": str(genesis),
        "cert": str(cert), "bootstrap": (f"/ip4/127.0.0.1/tcp/{port}/p2p/{ids[0]}",),
        "vocabulary_wait": 30.0, "state_dir": str(tmp_path / "newcomer-state")}, {})
    states = [local_state(founder), local_state(newcomer)]
    # No tight timing: the founder's window is long, and ends (as if its time were up)
    # once the newcomer has had an answer; the newcomer then adopts the frozen union.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_phase, founder, keys[0], states[0])
        await trio.sleep(0.5)  # the founder listens first
        with trio.fail_after(60):
            nursery.start_soon(_phase, newcomer, keys[2], states[1])
            while states[1].answers == 0:
                await trio.sleep(0.05)
            states[0].freeze()
            while not states[1].adopted:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert states[1].answers > 0
    assert states[0].union == states[1].union
    assert states[0].union.categories == {"smoker": frozenset({"current", "former", "never"})}


def test_a_checkpoint_from_before_the_agreement_keeps_its_files_own_shape(
    tmp_path: Path,
) -> None:
    config = _member_config(tmp_path, "/ip4/127.0.0.1/tcp/9/p2p/" + NodeKey.generate().peer_id)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "checkpoint.p2ck").write_bytes(b"from an older version")
    agreed = agree_vocabulary(config, NodeKey.generate())  # no dial: nothing to wait for
    own = local_state(config).own
    assert agreed.restored and agreed.state.frozen and agreed.state.union == own


async def test_a_member_started_early_waits_for_its_peers_later_freeze(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vocabulary, "FREEZE_GRACE_S", 1.0)
    async with Transport.open(NodeKey.generate()) as founder:
        config = dataclasses.replace(_member_config(tmp_path, founder.addrs[0]),
                                     vocabulary_wait=2.0)  # on its own: ends at 3 s
        early = local_state(config)
        network = VocabularyState(NETWORK, early.fingerprint, early.columns, "outcome")
        # The founder started after it: its window ends at 3.5 s, past the early one's own.
        network.freeze_at = trio.current_time() + 3.5
        founder.set_handler(VOCABULARY_PROTOCOL, serve_frozen(network, None),
                            MAX_VOCABULARY_MESSAGE_BYTES, 2.0)

        async def window_ends() -> None:
            await trio.sleep_until(network.freeze_at or 0.0)
            network.freeze()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(window_ends)
            _, peers = await _phase(config, NodeKey.generate(), early)
    assert peers == 1 and early.adopted and early.union == network.union
    assert early.union.categories["smoker"] == frozenset({"current", "former", "never"})


def test_a_union_that_never_froze_is_used_but_not_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(vocabulary, "FREEZE_GRACE_S", 0.5)
    unreachable = f"/ip4/127.0.0.1/tcp/{_free_port()}/p2p/{NodeKey.generate().peer_id}"
    config = dataclasses.replace(_member_config(tmp_path, unreachable), vocabulary_wait=1.0)
    with caplog.at_level(logging.DEBUG):
        agreed = agree_vocabulary(config, NodeKey.generate())
    assert agreed.state.frozen and not agreed.state.adopted
    assert agreed.state.union == local_state(config).own
    assert not (tmp_path / "state" / VOCABULARY_FILE).exists()
    assert "not saved" in caplog.text
    # A peer that cannot be dialled is a warning once, then debug (every 250 ms).
    for what in ("exchange with", "Failed to open TCP stream"):  # ours, and libp2p's
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and what in r.getMessage()
                    and r.name.startswith("p2pfl")]
        assert len(warnings) == 1, warnings
        assert sum(what in r.getMessage() for r in caplog.records) > 2


def test_an_unreadable_saved_union_next_to_a_checkpoint_refuses_to_start(
    tmp_path: Path,
) -> None:
    config = _member_config(tmp_path, "/ip4/127.0.0.1/tcp/9/p2p/" + NodeKey.generate().peer_id)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "checkpoint.p2ck").write_bytes(b"a model over the saved union")
    (tmp_path / "state" / VOCABULARY_FILE).write_bytes(b"torn")
    with pytest.raises(ValueError, match="vocabulary.msgpack: cannot be read") as caught:
        agree_vocabulary(config, NodeKey.generate())
    assert "checkpoint.p2ck" in str(caught.value) and "\n" not in str(caught.value)
