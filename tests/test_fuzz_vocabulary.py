"""Fuzzing the vocabulary decoder (gossip/vocabulary.py): any bytes give a Message or
InvalidVocabulary, never another exception, and a node serving them never grows its union
from a message it refused."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.vocabulary import (
    InvalidVocabulary,
    Message,
    Vocabulary,
    VocabularyState,
    decode,
    encode,
    vocabulary_fingerprint,
)

pytestmark = pytest.mark.property

TASK = vocabulary_fingerprint("y", ["a"], "mlp:64")
OWN = Vocabulary({"a": frozenset({"x"})}, frozenset({"0", "1"}))
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8),
                  st.binary(max_size=40), st.sampled_from([TASK, 1, "v", "task"]))
_values = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
_near = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 2, "1"]), "task": st.sampled_from([TASK, TASK, b"x" * 32]),
     "frozen": st.sampled_from([True, False, 0]),
     "freezes_in": st.sampled_from([0.0, 1.5, 7, -1.0, True, float("nan"), 1e9]),
     "categories": _values, "classes": _values})


def _check(data: bytes) -> None:
    state = VocabularyState(OWN, TASK, ("a",), "y")
    try:
        message = decode(data, TASK)
    except InvalidVocabulary as error:
        assert "\n" not in str(error)
        assert state.serve(data).startswith(b"refused: ")
        assert state.union == OWN and state.refused == 1
        return
    assert isinstance(message, Message)
    assert decode(encode(message), TASK) == message
    state.serve(data)
    assert set(state.union.categories) <= {"a"}  # never a column the task lacks


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=300, deadline=None)
@given(_near)
def test_near_valid_maps(fields: dict[str, object]) -> None:
    _check(msgpack.packb(fields, use_bin_type=True))
