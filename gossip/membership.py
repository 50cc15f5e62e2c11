"""Who is a member of a network, at a given time: certificates and the revocation log.

Sans-I/O, like the rest of gossip/: objects and ``now`` (integer unix seconds) in,
answers and counted refusals out. The formats are in :mod:`gossip.member_formats`.

The rules (docs/PROTOCOL.md, "Membership"):

* The founders (the genesis) are members until revoked; they hold no expiry.
* A certificate makes its peer a member at ``now`` when it is for this network,
  ``not_before <= now < not_after``, neither its peer nor its serial is revoked at
  ``now``, no signer appears twice, every signature verifies, and at least k
  distinct signers are members at ``now``. "Member" is the least fixpoint from the
  founders, so certificates cannot vouch for each other in a circle, and a
  certificate stops counting when enough of its signers are revoked or expire.
* A revocation entry joins the log when it is for this network, continues the
  log (``seq`` = its length, ``prev`` = its head), was not issued before the entry
  before it nor after ``now`` (plus a skew), and k distinct signers were members at
  its ``issued`` time under the log before it. An entry, once in the log, stays:
  a log is only ever extended, so an older log replayed changes nothing.

A signature counts once per signer whatever it says, so k-1 members, however they
collude, can neither admit nor revoke anyone; k members can do both (and anything).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from gossip.member_formats import (
    Certificate,
    Genesis,
    MemberFormatError,
    RevocationEntry,
)

# How far in the future an entry's ``issued`` may lie: members' clocks differ.
MAX_CLOCK_SKEW_S = 300
# Known certificates in all; more are refused (a hostile member could sign many).
MAX_CERTIFICATES = 4096
MAX_LOG_ENTRIES = 4096


class Refusal(StrEnum):
    """Why a certificate or a log was not taken; operators see these names in counters."""

    MALFORMED = "malformed"
    WRONG_NETWORK = "wrong-network"
    TOO_FEW_SIGNATURES = "too-few-signatures"
    DUPLICATE_SIGNER = "duplicate-signer"
    SIGNER_NOT_MEMBER = "signer-not-member"
    BAD_SIGNATURE = "bad-signature"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    STALE_LOG = "stale-log"
    LOG_FORK = "log-fork"
    LOG_GAP = "log-gap"
    BAD_TIME = "bad-time"
    FULL = "full"


@dataclass(frozen=True)
class Refused:
    reason: Refusal
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


@dataclass(frozen=True)
class LogHead:
    """What two nodes compare on connect: the log's length and its last entry's hash."""

    length: int
    head: bytes


class MemberSet:
    """A network's members as this node knows them: genesis, certificates, revocation log."""

    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self.network_id = genesis.network_id
        self.threshold = genesis.threshold
        self.founders = frozenset(genesis.founders)
        self.log: list[RevocationEntry] = []
        self._hashes: list[bytes] = []
        # peer id -> its certificates whose signatures all verify (not yet judged valid).
        self._certs: dict[str, dict[bytes, Certificate]] = {}
        self.refused: Counter[str] = Counter()

    # -- the log --------------------------------------------------------------------------

    @property
    def head(self) -> LogHead:
        return LogHead(len(self.log), self._hashes[-1] if self._hashes else self.network_id)

    def hash_at(self, length: int) -> bytes:
        """The head hash the log had when it was ``length`` entries long."""
        return self._hashes[length - 1] if length else self.network_id

    def _revoked(self, entries: Iterable[RevocationEntry], at: int) -> tuple[set[str], set[int]]:
        peers: set[str] = set()
        serials: set[int] = set()
        for entry in entries:
            if entry.effective <= at:
                (peers if entry.kind == "peer" else serials).add(entry.target)  # type: ignore[arg-type]
        return peers, serials

    def extend_log(self, entries: list[RevocationEntry], now: int) -> int | Refused:
        """Append what ``entries`` (a log, or a part of one from any ``seq``) add to ours.

        Entries we hold already must be ours exactly (else ``log-fork``); a log that
        adds nothing and ends before our head is ``stale-log`` (a replay of an older
        log: it changes nothing). Returns how many entries were appended.
        """
        added = 0
        ends_before_head = bool(entries) and entries[-1].seq + 1 < len(self.log)
        for entry in entries:
            if entry.seq < len(self.log):
                if entry.body_hash != self._hashes[entry.seq]:
                    return self._refuse(Refusal.LOG_FORK, f"entry {entry.seq} differs from ours")
                continue
            problem = self._check_entry(entry, now)
            if problem is not None:
                refused = self._refuse(problem.reason, problem.detail)
                return added if added else refused  # what came before it is kept
            self.log.append(entry)
            self._hashes.append(entry.body_hash)
            added += 1
        if not added and ends_before_head:
            return self._refuse(
                Refusal.STALE_LOG,
                f"a log of {entries[-1].seq + 1} entries; ours has {len(self.log)}",
            )
        return added

    def _check_entry(self, entry: RevocationEntry, now: int) -> Refused | None:
        if entry.network != self.network_id:
            return Refused(Refusal.WRONG_NETWORK, "the entry is for another network")
        if entry.seq > len(self.log):
            return Refused(Refusal.LOG_GAP, f"entry {entry.seq} after {len(self.log)} entries")
        if entry.prev != self.head.head:
            return Refused(Refusal.LOG_FORK, f"entry {entry.seq} does not follow our head")
        if len(self.log) >= MAX_LOG_ENTRIES:
            return Refused(Refusal.FULL, f"the log holds {MAX_LOG_ENTRIES} entries")
        last_issued = self.log[-1].issued if self.log else 0
        if not last_issued <= entry.issued <= now + MAX_CLOCK_SKEW_S:
            return Refused(Refusal.BAD_TIME, "issued before the entry before it, or in the future")
        members = self._members_at(entry.issued, self.log)
        return _check_integrity(entry, members, self.threshold) or self._check_signatures(
            entry, entry.issued, self.log
        )

    # -- certificates ---------------------------------------------------------------------

    def add_certificate(self, cert: Certificate, now: int) -> Refused | None:
        """Keep ``cert`` if it makes its peer a member at ``now``; else the counted reason."""
        if cert.network != self.network_id:
            return self._refuse(Refusal.WRONG_NETWORK, f"certificate of {cert.peer}")
        known = self._certs.get(cert.peer, {})
        if cert.body_hash in known and len(known[cert.body_hash].sigs) >= len(cert.sigs):
            return None  # already held, with as many signatures
        if sum(map(len, self._certs.values())) >= MAX_CERTIFICATES:
            return self._refuse(Refusal.FULL, f"{MAX_CERTIFICATES} certificates known")
        problem = self._check_certificate(cert, now)
        if problem is not None:
            return self._refuse(problem.reason, problem.detail)
        self._certs.setdefault(cert.peer, {})[cert.body_hash] = cert
        return None

    def add_encoded_certificate(self, data: bytes, now: int) -> Certificate | Refused:
        """:meth:`add_certificate` for bytes from a peer: malformed ones are counted too."""
        try:
            cert = Certificate.decode(data)
        except MemberFormatError as error:
            return self._refuse(Refusal.MALFORMED, str(error))
        problem = self.add_certificate(cert, now)
        return cert if problem is None else problem

    def check_certificate(self, cert: Certificate, now: int) -> Refused | None:
        """Why ``cert`` would not make its peer a member at ``now`` (None: it would)."""
        if cert.network != self.network_id:
            return Refused(Refusal.WRONG_NETWORK, "the certificate is for another network")
        return self._check_certificate(cert, now)

    def _check_certificate(self, cert: Certificate, now: int) -> Refused | None:
        # Integrity first: an altered certificate is bad-signature whatever else it says.
        # Only the signatures that can count are verified (those of current members),
        # plus one stranger's when too few count: a certificate signed by 64 throwaway
        # keys costs one ed25519 verify, not 64 (verifies are the cost of this check).
        problem = _check_integrity(cert, self._members_at(now, self.log), self.threshold)
        if problem is not None:
            return problem
        if now < cert.not_before:
            return Refused(Refusal.NOT_YET_VALID, f"valid from {cert.not_before}")
        if now >= cert.not_after:
            return Refused(Refusal.EXPIRED, f"expired at {cert.not_after}")
        peers, serials = self._revoked(self.log, now)
        if cert.peer in peers or cert.serial in serials:
            return Refused(Refusal.REVOKED, f"{cert.peer} (serial {cert.serial}) is revoked")
        return self._check_signatures(cert, now, self.log)

    def _check_signatures(
        self, item: Certificate | RevocationEntry, at: int, log: list[RevocationEntry]
    ) -> Refused | None:
        members = self._members_at(at, log)
        counted = [s for s in item.signers() if s in members]
        if len(counted) >= self.threshold:
            return None
        strangers = [s for s in item.signers() if s not in members]
        if strangers:
            return Refused(
                Refusal.SIGNER_NOT_MEMBER,
                f"{len(counted)} of {self.threshold} signatures are by members; "
                f"{strangers[0]} is not a member (revoked, expired or unknown)",
            )
        return Refused(
            Refusal.TOO_FEW_SIGNATURES,
            f"{len(counted)} signatures, the network needs {self.threshold}",
        )

    # -- who is a member ------------------------------------------------------------------

    def _members_at(self, at: int, log: list[RevocationEntry]) -> set[str]:
        """The least fixpoint: founders not revoked, then peers whose certificate has k
        signers already in the set, until nothing changes. Signatures were verified when
        each certificate was added, so this is set arithmetic only."""
        peers, serials = self._revoked(log, at)
        members = {f for f in self.founders if f not in peers}
        waiting = [
            cert
            for peer, certs in self._certs.items()
            if peer not in members and peer not in peers
            for cert in certs.values()
            if cert.not_before <= at < cert.not_after and cert.serial not in serials
        ]
        changed = True
        while changed and waiting:
            changed = False
            for cert in list(waiting):
                if cert.peer in members:
                    waiting.remove(cert)
                elif len(set(cert.signers()) & members) >= self.threshold:
                    members.add(cert.peer)
                    waiting.remove(cert)
                    changed = True
        return members

    def members(self, now: int) -> frozenset[str]:
        """Every peer that is a member at ``now``."""
        return frozenset(self._members_at(now, self.log))

    def is_member(self, peer: str, now: int) -> bool:
        return peer in self._members_at(now, self.log)

    def revoked_peers(self, now: int) -> frozenset[str]:
        """Peer ids revoked at ``now``: refused on sight, whatever certificate they show."""
        return frozenset(self._revoked(self.log, now)[0])

    def certificates(self) -> list[Certificate]:
        """Every certificate held, to pass on to a neighbour."""
        return [cert for certs in self._certs.values() for cert in certs.values()]

    def certificate_of(self, peer: str, now: int) -> Certificate | None:
        """The valid certificate of ``peer`` at ``now`` that lasts longest, if any."""
        valid = [
            cert for cert in self._certs.get(peer, {}).values()
            if self.check_certificate(cert, now) is None
        ]
        return max(valid, key=lambda cert: cert.not_after, default=None)

    def _refuse(self, reason: Refusal, detail: str) -> Refused:
        self.refused[reason.value] += 1
        return Refused(reason, detail)


def _check_integrity(
    item: Certificate | RevocationEntry, members: set[str], threshold: int
) -> Refused | None:
    """Duplicate signers, then the signatures that can count: those of ``members``, plus
    one stranger's when too few count (so that an altered signer id reads as a bad
    signature). A certificate signed by 64 throwaway keys costs one ed25519 verify, not
    64: verifies are what a check costs, and strangers may send them."""
    duplicate = item.duplicate_signer()
    if duplicate is not None:
        return Refused(Refusal.DUPLICATE_SIGNER, f"{duplicate} signed twice")
    counted = [s for s in item.signers() if s in members]
    strangers = [s for s in item.signers() if s not in members]
    forged = item.forged_signer(counted if len(counted) >= threshold else counted + strangers[:1])
    if forged is not None:
        return Refused(Refusal.BAD_SIGNATURE, f"the signature of {forged} does not verify")
    return None


def expiry_warning(cert: Certificate, now: int) -> bool:
    """True in the last third of ``cert``'s life (renew it: the same co-signing as joining)."""
    life = cert.not_after - cert.not_before
    return now >= cert.not_after - life // 3

