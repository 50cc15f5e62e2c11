"""The network's membership on a running node: ``/p2pfl/members/1.0.0``, the inbox, expiry.

The rules are gossip/'s (:class:`gossip.membership.MemberSet`); this module moves
them around and keeps :class:`p2pfl.member_source.MemberSource` current:

* **The protocol** (docs/PROTOCOL.md, "Membership"): one framed request, one framed
  reply, both the map ``{"network", "length", "head", "from", "entries", "certs"}``:
  the sender's log head, the entries it holds from index ``from`` on (what it knows
  the other lacks; often none), and the certificates it holds. Whoever is behind
  learns from the other's entries, Tailnet-Lock style: a node compares heads, and a
  node that was offline catches up on its next sync. A newcomer's own certificate
  travels in its first request, before it may use any other protocol.
* **When**: right after bootstrap, every :data:`SYNC_INTERVAL_S` with the members we
  are connected to, and at once to all of them when our log or certificates grew,
  so a revocation floods the overlay in a few hops.
* **The inbox**: ``p2pfl member publish`` drops files that are taken here.
* **Time**: every :data:`REFRESH_S` the member set is judged at the wall clock, so a
  certificate that expires stops counting on time, without any message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from gossip.member_formats import Certificate, Genesis, MemberFormatError, RevocationEntry
from gossip.membership import MAX_CERTIFICATES, MAX_LOG_ENTRIES, MemberSet, expiry_warning
from p2pfl.member_source import MemberSource
from p2pfl.member_store import (
    MemberFileError,
    add_certificates,
    inbox,
    load_state,
    read_genesis,
    read_object,
    save_state,
)
from p2pfl.transport import Transport, TransportError

logger = logging.getLogger(__name__)

MEMBERS_PROTOCOL = "/p2pfl/members/1.0.0"
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SYNC_INTERVAL_S = 5.0
REFRESH_S = 0.25
MESSAGE_FIELDS = frozenset({"network", "length", "head", "from", "entries", "certs"})
WARN_EVERY_S = 3600.0


def member_service(
    config: Any, key: Any, announce: Callable[[str], None]
) -> MemberService | None:
    """The service ``--network``/``--cert`` ask for (None without them); ConfigError-style
    ValueError naming a file that cannot be used."""
    if config.network is None:
        return None
    try:
        genesis = read_genesis(config.network)
        cert = read_object(config.cert, Certificate) if config.cert else None
    except MemberFileError as error:
        raise ValueError(f"--network/--cert: {error}") from None
    assert cert is None or isinstance(cert, Certificate)
    if cert is None and key.peer_id not in genesis.founders:
        raise ValueError("--network: this key is no founder; give its certificate with --cert")
    if cert is not None and (cert.peer != key.peer_id or cert.network != genesis.network_id):
        raise ValueError(f"--cert {config.cert}: it is for another key or network")
    try:
        return MemberService(genesis, cert, key.peer_id, config.state_dir, announce)
    except MemberFileError as error:
        raise ValueError(str(error)) from None


def encode_message(members: MemberSet, start: int, with_certs: bool = True) -> bytes:
    head = members.head
    certs = [cert.encode() for cert in members.certificates()] if with_certs else []
    return msgpack.packb({
        "network": members.network_id, "length": head.length, "head": head.head,
        "from": start, "entries": [entry.encode() for entry in members.log[start:]],
        "certs": certs,
    }, use_bin_type=True)


def decode_message(data: bytes) -> dict[str, Any]:
    """The message's fields, entries and certificates decoded; MemberFormatError if bad."""
    try:
        message = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_map_len=len(MESSAGE_FIELDS),
            max_array_len=MAX_CERTIFICATES + MAX_LOG_ENTRIES, max_ext_len=0,
            max_str_len=64, max_bin_len=64 * 1024,
        )
    except Exception as error:  # msgpack raises many types for hostile input
        raise MemberFormatError(f"not msgpack ({type(error).__name__})") from None
    if not isinstance(message, dict) or set(message) != MESSAGE_FIELDS:
        raise MemberFormatError("a members message has exactly the fields " +
                                ", ".join(sorted(MESSAGE_FIELDS)))
    for name in ("length", "from"):
        if type(message[name]) is not int or not 0 <= message[name] <= MAX_LOG_ENTRIES:
            raise MemberFormatError(f"{name} must be an integer up to {MAX_LOG_ENTRIES}")
    for name in ("network", "head"):
        if type(message[name]) is not bytes or len(message[name]) != 32:
            raise MemberFormatError(f"{name} must be 32 bytes")
    for name in ("entries", "certs"):
        if type(message[name]) is not list or not all(type(i) is bytes for i in message[name]):
            raise MemberFormatError(f"{name} must be a list of byte strings")
    return message


class MemberService:
    """One node's view of the network's members, kept current and shared."""

    def __init__(
        self,
        genesis: Genesis,
        own_cert: Certificate | None,
        own_peer: str,
        state_dir: str,
        announce: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.members = MemberSet(genesis)
        self.own_cert = own_cert
        self.own_peer = own_peer
        self.state_dir = state_dir
        self.announce = announce
        self.clock = clock
        load_state(self.members, state_dir, self.now())
        if own_cert is not None:
            self.members.add_certificate(own_cert, self.now())
        self.source = MemberSource(self._current(), open_to_strangers=True)
        self.transport: Transport | None = None
        self.synced = 0
        self.sync_failures = 0
        self._grew = trio.Event()
        self._warned_at = -WARN_EVERY_S

    def now(self) -> int:
        return int(self.clock())

    def _current(self) -> frozenset[str]:
        return self.members.members(self.now())

    # -- keeping the source current -------------------------------------------------------

    def refresh(self) -> None:
        """Judge the member set at the clock now and tell every layer who changed."""
        now = self.now()
        if self.own_cert is not None and not self.members.is_member(self.own_peer, now):
            self.members.add_certificate(self.own_cert, now)  # its signers may be known now
        added, removed = self.source.update(
            self.members.members(now), self.members.revoked_peers(now)
        )
        for peer in sorted(removed):
            logger.warning("%s is no longer a member (revoked or expired): disconnecting", peer)
        self._warn_expiry(now)

    def _warn_expiry(self, now: int) -> None:
        cert = self.own_cert
        if cert is None or not expiry_warning(cert, now) or now - self._warned_at < WARN_EVERY_S:
            return
        self._warned_at = now
        logger.warning(
            "this node's certificate (serial %d) expires at %d: renew it with "
            "`p2pfl member sign` (k members) and restart with the new --cert",
            cert.serial, cert.not_after,
        )

    def _changed(self) -> None:
        save_state(self.members, self.state_dir)
        self.refresh()
        self._grew.set()

    def absorb(self, message: dict[str, Any]) -> bool:
        """Take what a peer's message adds; True if our log or certificates grew."""
        members, now = self.members, self.now()
        if message["network"] != members.network_id:
            members.refused["wrong-network"] += 1
            return False
        before = (members.head.length, len(members.certificates()))
        certs = []
        for data in message["certs"]:
            try:
                certs.append(Certificate.decode(data))
            except MemberFormatError:
                members.refused["malformed"] += 1
        add_certificates(members, certs, now)
        entries = []
        for data in message["entries"]:
            try:
                entries.append(RevocationEntry.decode(data))
            except MemberFormatError:
                members.refused["malformed"] += 1
                break
        if entries:
            members.extend_log(entries, now)
            add_certificates(members, certs, now)
        grew = (members.head.length, len(members.certificates())) != before
        if grew:
            self._changed()
        return grew

    def _behind_at(self, message: dict[str, Any]) -> int | None:
        """Where the sender's log ends, if it is a prefix of ours that lacks entries."""
        length = message["length"]
        if length < self.members.head.length and self.members.hash_at(length) == message["head"]:
            return length
        return None

    # -- the protocol ---------------------------------------------------------------------

    def serve(self, transport: Transport, read_timeout: float) -> None:
        self.transport = transport
        transport.inbound.open_protocols = frozenset({MEMBERS_PROTOCOL})

        async def handle(peer_id: str, payload: bytes) -> bytes | None:
            try:
                message = decode_message(payload)
            except MemberFormatError:
                self.members.refused["malformed"] += 1
                return None
            self.absorb(message)
            start = self._behind_at(message)
            if peer_id not in self.source:
                # Still a stranger (its certificate did not make it a member): tell it
                # our head, nothing more, and let it go.
                transport.nursery.start_soon(transport.disconnect, peer_id)
                return encode_message(self.members, self.members.head.length, with_certs=False)
            return encode_message(self.members, self.members.head.length if start is None
                                  else start)

        transport.set_handler(MEMBERS_PROTOCOL, handle, MAX_MESSAGE_BYTES, read_timeout)

    async def sync_with(self, peer_id: str, timeout: float) -> bool:
        """Compare heads with ``peer_id`` and exchange what either lacks; False if it failed."""
        transport = self.transport
        assert transport is not None
        start = self.members.head.length
        try:
            for _ in range(2):  # the second round only when the peer was behind us
                reply = await transport.request(
                    peer_id, MEMBERS_PROTOCOL, encode_message(self.members, start), timeout,
                    MAX_MESSAGE_BYTES,
                )
                message = decode_message(reply)
                self.absorb(message)
                behind = self._behind_at(message)
                if behind is None:
                    break
                start = behind
        except (TransportError, MemberFormatError) as error:
            self.sync_failures += 1
            logger.debug("members sync with %s failed: %s", peer_id, error)
            return False
        self.synced += 1
        return True

    async def sync_all(self, timeout: float) -> None:
        transport = self.transport
        assert transport is not None
        peers = [p for p in transport.connected_peers() if p in self.source]
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(self.sync_with, peer, timeout)

    async def run(self, timeout: float) -> None:
        """The loops: refresh and inbox, periodic sync, and a flood when we learn news."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._flood_loop, timeout)
            while True:
                await trio.sleep(SYNC_INTERVAL_S)
                await self.sync_all(timeout)

    async def _refresh_loop(self) -> None:
        while True:
            self.take_inbox()
            self.refresh()
            await trio.sleep(REFRESH_S)

    async def _flood_loop(self, timeout: float) -> None:
        while True:
            await self._grew.wait()
            self._grew = trio.Event()
            await self.sync_all(timeout)

    def take_inbox(self) -> int:
        """Take the files ``p2pfl member publish`` left; a bad one is renamed ``.refused``."""
        folder = inbox(self.state_dir)
        try:
            files = sorted(p for p in folder.iterdir() if p.suffix in (".certificate",
                                                                     ".revocationentry"))
        except FileNotFoundError:
            return 0
        now, taken = self.now(), 0
        for path in files:
            problem = self._take(path, now)
            if problem is None:
                path.unlink(missing_ok=True)
                taken += 1
            else:
                logger.warning("membership inbox: %s refused: %s", path.name, problem)
                path.replace(path.with_suffix(path.suffix + ".refused"))
        if taken:
            self._changed()
        return taken

    def _take(self, path: Path, now: int) -> str | None:
        try:
            item = read_object(path)
        except MemberFileError as error:
            return str(error)
        if isinstance(item, Certificate):
            refused = self.members.add_certificate(item, now)
            return None if refused is None else str(refused)
        if isinstance(item, RevocationEntry):
            result = self.members.extend_log([item], now)
            return None if isinstance(result, int) else str(result)
        return "a genesis is given with --network, not published"

    def status(self) -> dict[str, Any]:
        members, now, cert = self.members, self.now(), self.own_cert
        return {
            "network_id": members.network_id.hex(),
            "members_known": len(self.source),
            "member_log_length": members.head.length,
            "member_log_head": members.head.head.hex(),
            "cert_serial": cert.serial if cert else None,
            "cert_signers": cert.signers() if cert else [],
            "cert_not_after": cert.not_after if cert else None,
            "cert_expiry_warning": bool(cert and expiry_warning(cert, now)),
            "cert_valid": self.members.is_member(self.own_peer, now),
            "member_refusals": dict(members.refused),
            "member_syncs": self.synced,
        }
