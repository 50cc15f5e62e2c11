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
Each column (and the classes) is capped at :data:`MAX_CATEGORIES` values, the
smallest first, so every node keeps the same ones and a member listing junk
can grow everyone's width by a bounded amount only.

A column is categorical for all when any member's vocabulary lists it (the
union of the categorical column sets): numeric-versus-categorical is then the
same decision on every member, whatever its own cells look like.

The state (:class:`VocabularyState`) is h11-style: bytes in, bytes and
decisions out, the caller owns the streams (p2pfl/vocabulary.py). Once the
node's agreement phase ends its union is *frozen*: it still answers requests,
with the frozen union and a ``frozen`` flag, and never grows again, so a
member that starts later takes the network's vocabulary as it is.

The message (request and answer alike, docs/PROTOCOL.md "Vocabulary") is the
msgpack map ``{"v", "task", "frozen", "categories", "classes"}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
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

Categories = Mapping[str, frozenset[str]]
_FIELDS = {"v", "task", "frozen", "categories", "classes"}


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
    """One request or answer: a vocabulary, and whether its sender's is frozen."""

    fingerprint: bytes
    vocabulary: Vocabulary
    frozen: bool = False


def encode(message: Message) -> bytes:
    """msgpack with sorted lists: the same vocabulary is the same bytes on every node."""
    vocabulary = message.vocabulary
    return msgpack.packb({
        "v": VOCABULARY_FORMAT,
        "task": message.fingerprint,
        "frozen": message.frozen,
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
        raise InvalidVocabulary("expected the keys v, task, frozen, categories, classes")
    if raw["v"] != VOCABULARY_FORMAT:
        raise InvalidVocabulary(f"unknown format {raw['v']!r:.20}")
    task = raw["task"]
    if type(task) is not bytes or len(task) != FINGERPRINT_BYTES:
        raise InvalidVocabulary(f"task must be {FINGERPRINT_BYTES} bytes")
    if task != fingerprint:
        raise InvalidVocabulary("vocabulary of another task (label, columns or model differ)")
    if type(raw["frozen"]) is not bool:
        raise InvalidVocabulary("frozen must be true or false")
    vocabulary = Vocabulary(decode_categories(raw["categories"]),
                            _strings("classes", raw["classes"]))
    return Message(task, vocabulary, raw["frozen"])


class VocabularyState:
    """One node's union: what it serves, what it learned, and whether it has settled.

    ``own`` is the node's own vocabulary; the union starts there and only grows,
    until :meth:`freeze`, or until a peer's frozen union is adopted in its place.
    Settled: a frozen union was adopted, or at least one peer answered and the last
    ``stable_after`` answers added nothing (the daemon waits for the first, and
    reports the second when its wait ran out, p2pfl/vocabulary.py).
    """

    def __init__(self, own: Vocabulary, fingerprint: bytes, *,
                 stable_after: int = STABLE_EXCHANGES) -> None:
        if len(fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(f"a fingerprint is {FINGERPRINT_BYTES} bytes")
        self.own = own
        self.fingerprint = fingerprint
        self.stable_after = stable_after
        self.union = own
        self.frozen = False
        self.adopted = False  # took a frozen network's union as it is
        self.answers = 0
        self.stable = 0
        self.served = 0
        self.refused = 0
        self.last_refusal = ""

    @property
    def settled(self) -> bool:
        return self.adopted or (self.answers > 0 and self.stable >= self.stable_after)

    def request(self) -> bytes:
        """What to send a peer: our union so far."""
        return encode(Message(self.fingerprint, self.union, self.frozen))

    def _grow(self, vocabulary: Vocabulary) -> bool:
        merged = self.union.union(vocabulary)
        grew = merged != self.union
        self.union = merged
        if grew:
            self.stable = 0  # whoever made it grow, our answers so far are stale
        return grew

    def serve(self, payload: bytes) -> bytes:
        """Answer a peer's request: our union after taking theirs (frozen: as it is).

        A bad request is counted and answered with one line starting ``refused:``."""
        try:
            message = decode(payload, self.fingerprint)
        except InvalidVocabulary as error:
            return self.refuse(str(error))
        if not self.frozen and not self.adopted:
            self._grow(message.vocabulary)
        self.served += 1
        return self.request()

    def refuse(self, reason: str) -> bytes:
        """Count a refusal; the one-line answer to send back."""
        self.refused += 1
        self.last_refusal = reason
        return f"refused: {reason}"[:200].encode()

    def answered(self, payload: bytes) -> None:
        """Take a peer's answer; InvalidVocabulary if it cannot be trusted."""
        if payload.startswith(b"refused:"):
            raise InvalidVocabulary(payload[:200].decode("utf-8", "replace"))
        message = decode(payload, self.fingerprint)
        self.answers += 1
        if self.frozen or self.adopted:
            return
        if message.frozen:
            # A running network never grows its union again: take it as it is, even if
            # it lacks some of ours (those cells are encoded all-zero, docs/DATA.md).
            self.union = message.vocabulary
            self.adopted = True
            return
        if not self._grow(message.vocabulary):
            self.stable += 1

    def freeze(self) -> None:
        """The phase is over: from now on answer with this union and never grow it."""
        self.frozen = True
