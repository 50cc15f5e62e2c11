"""Categorical vocabularies agreed before a CSV task's model is built, sans-I/O.

A CSV member one-hot encodes each categorical column over the categories in
its own file and takes its classes from its own label column (issue 25). Two
hospitals whose files hold different category sets build models of different
widths, their layout fingerprints differ, and they refuse each other's
updates. So before any model exists, members exchange their vocabularies and
each builds its model over the union: every categorical column with every
category any member saw, and every class.

Union is idempotent, commutative and associative, so it needs no weights and
no rounds: a vocabulary only grows, and repeating a message changes nothing.
A node takes only the feature columns its task was fingerprinted over (the
columns, not the label) and refuses, in one counted line, a message naming
another column, or one whose merge would push a column (or the classes) past
:data:`MAX_CATEGORIES` values: the union keeps what it had, so a member
listing junk can add junk up to the cap, never evict a value already agreed.

A column is categorical for all when any member's vocabulary lists it (the
union of the categorical column sets): numeric-versus-categorical is then the
same decision on every member, whatever its own cells look like.

The state (:class:`VocabularyState`) is h11-style: bytes in, bytes and
decisions out, the caller owns the streams (p2pfl/vocabulary.py). Once the
node's agreement phase ends its union is *frozen*: it still answers requests,
with the frozen union and a ``frozen`` flag, and never grows again, so a
member that starts later takes the network's vocabulary as it is.

The message (request and answer alike, docs/PROTOCOL.md "Vocabulary") is the
msgpack map ``{"v", "task", "frozen", "freezes_in", "categories", "classes"}``:
``freezes_in`` is how many seconds the sender's agreement window has left (0
once frozen), so that a member that bootstrapped early waits for its peer's
freeze rather than only for its own window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack

VOCABULARY_FORMAT = 1
# The same number as fltasks.tabular.MAX_CATEGORIES (gossip imports nothing of ours;
# tests/test_vocabulary.py checks they agree): more is refused by the task anyway.
MAX_CATEGORIES = 256
MAX_COLUMNS = 4_096
MAX_CATEGORY_CHARS = 256
# A wide CSV's vocabulary is a few hundred KB; anything near this bound is junk.
MAX_VOCABULARY_MESSAGE_BYTES = 4 * 1024 * 1024
FINGERPRINT_BYTES = 32
# Answers in a row that added nothing before a node calls its union settled.
STABLE_EXCHANGES = 3
# A bootstrap peer's daemon needs a moment after its window ends (its model built)
# before it answers frozen: a bootstrapping member waits this much past the peer's freeze.
FREEZE_GRACE_S = 5.0
# The most a message may say its sender's window has left (``--vocabulary-wait`` is
# seconds to a minute in practice): a bound, so a peer cannot keep us waiting for ever.
MAX_FREEZES_IN_S = 3_600.0

Categories = Mapping[str, frozenset[str]]
_FIELDS = {"v", "task", "frozen", "freezes_in", "categories", "classes"}


class InvalidVocabulary(ValueError):
    """A vocabulary message that cannot be trusted; the text is one line naming the field."""


def capped(values: frozenset[str]) -> frozenset[str]:
    """At most :data:`MAX_CATEGORIES` values, the smallest (as text) first: the same on
    every node, so that a member listing junk cannot grow widths without bound."""
    if len(values) <= MAX_CATEGORIES:
        return values
    return frozenset(sorted(values)[:MAX_CATEGORIES])


def union(a: Categories, b: Categories) -> dict[str, frozenset[str]]:
    """Every column of either, each with the union of its values (capped, smallest first)."""
    return {column: capped(a.get(column, frozenset()) | b.get(column, frozenset()))
            for column in sorted(set(a) | set(b))}


def decode_categories(value: object) -> dict[str, frozenset[str]]:
    """A ``{column: [value, ...]}`` map from the wire, every bound checked."""
    if not isinstance(value, dict) or len(value) > MAX_COLUMNS:
        raise InvalidVocabulary(f"categories must be a map of at most {MAX_COLUMNS} columns")
    out = {}
    for column, values in value.items():
        if type(column) is not str or len(column) > MAX_CATEGORY_CHARS:
            raise InvalidVocabulary(f"categories: a column name must be a string of at most "
                                    f"{MAX_CATEGORY_CHARS} characters")
        out[column] = _strings(f"categories[{column[:40]!r}]", values)
    return out


def _strings(what: str, values: object) -> frozenset[str]:
    if (type(values) is not list or len(values) > MAX_CATEGORIES
            or not all(type(v) is str and len(v) <= MAX_CATEGORY_CHARS for v in values)):
        raise InvalidVocabulary(f"{what}: at most {MAX_CATEGORIES} strings of "
                                f"{MAX_CATEGORY_CHARS} characters")
    return frozenset(values)


def vocabulary_fingerprint(label: str, columns: Sequence[str], model: str,
                           spec_hash: bytes = b"") -> bytes:
    """What must match for two members' vocabularies to mix: the label column, the
    feature columns in input order, the model and the task spec's hash (if any).

    A member of another task (another label, other columns) is refused instead of
    widening our model with columns we do not have."""
    data = msgpack.packb([VOCABULARY_FORMAT, label, list(columns), model, spec_hash],
                         use_bin_type=True)
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class Vocabulary:
    """Each categorical column's values, and the label's classes."""

    categories: Categories = field(default_factory=dict)
    classes: frozenset[str] = frozenset()

    def union(self, other: Vocabulary) -> Vocabulary:
        return Vocabulary(union(self.categories, other.categories),
                          capped(self.classes | other.classes))

    def covers(self, other: Vocabulary) -> bool:
        """Whether every column, category and class of ``other`` is in this one."""
        return other.classes <= self.classes and all(
            column in self.categories and values <= self.categories[column]
            for column, values in other.categories.items())

    @property
    def width(self) -> int:
        """One-hot features over every categorical column (numeric columns not counted)."""
        return sum(len(values) for values in self.categories.values())


@dataclass(frozen=True)
class Message:
    """One request or answer: a vocabulary, whether its sender's is frozen, and in how
    many seconds its sender's window ends (0 when frozen)."""

    fingerprint: bytes
    vocabulary: Vocabulary
    frozen: bool = False
    freezes_in: float = 0.0


def encode(message: Message) -> bytes:
    """msgpack with sorted lists: the same vocabulary is the same bytes on every node."""
    vocabulary = message.vocabulary
    return msgpack.packb({
        "v": VOCABULARY_FORMAT,
        "task": message.fingerprint,
        "frozen": message.frozen,
        "freezes_in": float(message.freezes_in),
        "categories": {k: sorted(v) for k, v in sorted(vocabulary.categories.items())},
        "classes": sorted(vocabulary.classes),
    }, use_bin_type=True)


def decode(data: bytes, fingerprint: bytes) -> Message:
    """Parse and check one message; :class:`InvalidVocabulary` names what is wrong."""
    if len(data) > MAX_VOCABULARY_MESSAGE_BYTES:
        raise InvalidVocabulary(f"message of {len(data)} bytes exceeds "
                                f"{MAX_VOCABULARY_MESSAGE_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data),
                              max_str_len=len(data), max_array_len=MAX_COLUMNS * MAX_CATEGORIES,
                              max_map_len=MAX_COLUMNS)
    except Exception as error:
        raise InvalidVocabulary(f"not a msgpack map ({type(error).__name__})") from None
    if not isinstance(raw, dict) or set(raw) != _FIELDS:
        raise InvalidVocabulary("expected the keys v, task, frozen, freezes_in, categories, "
                                "classes")
    if type(raw["v"]) is not int or raw["v"] != VOCABULARY_FORMAT:
        raise InvalidVocabulary(f"unknown format {raw['v']!r:.20}")
    task = raw["task"]
    if type(task) is not bytes or len(task) != FINGERPRINT_BYTES:
        raise InvalidVocabulary(f"task must be {FINGERPRINT_BYTES} bytes")
    if task != fingerprint:
        raise InvalidVocabulary("vocabulary of another task (label, columns or model differ)")
    if type(raw["frozen"]) is not bool:
        raise InvalidVocabulary("frozen must be true or false")
    freezes_in = raw["freezes_in"]
    if (type(freezes_in) not in (int, float) or not math.isfinite(freezes_in)
            or not 0 <= freezes_in <= MAX_FREEZES_IN_S):
        raise InvalidVocabulary(f"freezes_in must be seconds in [0, {MAX_FREEZES_IN_S:g}]")
    vocabulary = Vocabulary(decode_categories(raw["categories"]),
                            _strings("classes", raw["classes"]))
    return Message(task, vocabulary, raw["frozen"], float(freezes_in))


class VocabularyState:
    """One node's union: what it serves, what it learned, and whether it has settled.

    ``own`` is the node's own vocabulary; the union starts there and only grows,
    until :meth:`freeze`, or until a peer's frozen union is adopted in its place.
    ``columns`` are the feature columns the fingerprint covers (``label`` is not one
    of them): a message naming any other column is refused, so the union never holds
    a column the task does not have. Settled: a frozen union was adopted, or at least
    one peer answered and the last ``stable_after`` answers added nothing (the daemon
    waits for the first, and reports the second when its wait ran out,
    p2pfl/vocabulary.py). ``freeze_at`` (the caller's clock) is when this node's
    window ends; messages carry what is left of it (``freezes_in``), and
    ``peer_freeze_at`` is the latest end a peer announced, on the same clock.
    """

    def __init__(self, own: Vocabulary, fingerprint: bytes, columns: Iterable[str],
                 label: str, *, stable_after: int = STABLE_EXCHANGES) -> None:
        if len(fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(f"a fingerprint is {FINGERPRINT_BYTES} bytes")
        self.fingerprint = fingerprint
        self.columns = frozenset(columns) - {label}
        self.label = label
        self.stable_after = stable_after
        self.check(own)
        self.own = own
        self.union = own
        self.frozen = False
        self.adopted = False  # took a frozen network's union as it is
        self.freeze_at: float | None = None
        self.peer_freeze_at: float | None = None
        self.answers = 0
        self.stable = 0
        self.served = 0
        self.refused = 0
        self.last_refusal = ""

    @property
    def settled(self) -> bool:
        return self.adopted or (self.answers > 0 and self.stable >= self.stable_after)

    def check(self, vocabulary: Vocabulary) -> None:
        """InvalidVocabulary unless every column is one of the task's feature columns."""
        outside = sorted(set(vocabulary.categories) - self.columns)
        if outside:
            which = ("the label column" if outside[0] == self.label
                     else "not a feature column of this task")
            raise InvalidVocabulary(f"categories: column {outside[0][:40]!r} is {which}")

    def freezes_in(self, now: float) -> float:
        """Seconds until this node's window ends, as a message says it (0: frozen or unknown)."""
        if self.frozen or self.adopted or self.freeze_at is None:
            return 0.0
        return min(max(self.freeze_at - now, 0.0), MAX_FREEZES_IN_S)

    def request(self, now: float = 0.0) -> bytes:
        """What to send a peer: our union so far (frozen once ours is, or adopted)."""
        return encode(Message(self.fingerprint, self.union, self.frozen or self.adopted,
                              self.freezes_in(now)))

    def _merged(self, vocabulary: Vocabulary) -> Vocabulary:
        """Our union with ``vocabulary``; InvalidVocabulary (ours unchanged) if a column
        or the classes would then exceed :data:`MAX_CATEGORIES` values."""
        self.check(vocabulary)
        merged = Vocabulary(
            {column: self.union.categories.get(column, frozenset())
             | vocabulary.categories.get(column, frozenset())
             for column in sorted(set(self.union.categories) | set(vocabulary.categories))},
            self.union.classes | vocabulary.classes)
        for column, values in merged.categories.items():
            if len(values) > MAX_CATEGORIES:
                raise InvalidVocabulary(f"categories[{column[:40]!r}]: the union would hold "
                                        f"{len(values)} values, more than {MAX_CATEGORIES}")
        if len(merged.classes) > MAX_CATEGORIES:
            raise InvalidVocabulary(f"classes: the union would hold {len(merged.classes)}, "
                                    f"more than {MAX_CATEGORIES}")
        return merged

    def _grow(self, vocabulary: Vocabulary) -> bool:
        merged = self._merged(vocabulary)
        assert set(merged.categories) <= self.columns
        grew = merged != self.union
        self.union = merged
        if grew:
            self.stable = 0  # whoever made it grow, our answers so far are stale
        return grew

    def serve(self, payload: bytes, now: float = 0.0) -> bytes:
        """Answer a peer's request: our union after taking theirs (frozen: as it is).

        A bad request (malformed, a column outside the task's, or one that would push
        a column or the classes past the cap) is counted and answered with one line
        starting ``refused:``; the union keeps what it had."""
        try:
            message = decode(payload, self.fingerprint)
            if not self.frozen and not self.adopted:
                self._grow(message.vocabulary)
            else:
                self.check(message.vocabulary)
        except InvalidVocabulary as error:
            return self.refuse(str(error))
        self.served += 1
        return self.request(now)

    def refuse(self, reason: str) -> bytes:
        """Count a refusal; the one-line answer to send back."""
        self.refused += 1
        self.last_refusal = reason
        return f"refused: {reason}"[:200].encode()

    def answered(self, payload: bytes, now: float = 0.0) -> None:
        """Take a peer's answer; InvalidVocabulary if it cannot be trusted (ours unchanged)."""
        if payload.startswith(b"refused:"):
            raise InvalidVocabulary(payload[:200].decode("utf-8", "replace"))
        message = decode(payload, self.fingerprint)
        self.check(message.vocabulary)
        if self.frozen or self.adopted:
            self.answers += 1
            return
        if message.frozen:
            # A running network never grows its union again: take it as it is, even if
            # it lacks some of ours (those cells are encoded all-zero, docs/DATA.md).
            self.answers += 1
            self.union = message.vocabulary
            self.adopted = True
            return
        grew = self._grow(message.vocabulary)
        self.answers += 1
        self.stable = 0 if grew else self.stable + 1
        freeze_at = now + message.freezes_in
        if self.peer_freeze_at is None or freeze_at > self.peer_freeze_at:
            self.peer_freeze_at = freeze_at

    def freeze(self) -> None:
        """The phase is over: from now on answer with this union and never grow it."""
        self.frozen = True
