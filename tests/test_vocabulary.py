"""The vocabulary agreement's rules (gossip/vocabulary.py): union, caps, the wire format."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from fltasks import tabular
from gossip import feature_stats
from gossip.vocabulary import (
    MAX_CATEGORIES,
    MAX_CATEGORY_CHARS,
    MAX_VOCABULARY_MESSAGE_BYTES,
    InvalidVocabulary,
    Message,
    Vocabulary,
    VocabularyState,
    decode,
    encode,
    union,
    vocabulary_fingerprint,
)

pytestmark = pytest.mark.unit

COLUMNS = ("age", "site", "smoker")
TASK = vocabulary_fingerprint("outcome", COLUMNS, "mlp:64")
A = Vocabulary({"smoker": frozenset({"never", "current"})}, frozenset({"healthy", "sick"}))
B = Vocabulary({"smoker": frozenset({"never", "former"}), "site": frozenset({"east"})},
               frozenset({"healthy"}))


def _state(own: Vocabulary, **options: int) -> VocabularyState:
    return VocabularyState(own, TASK, COLUMNS, "outcome", **options)


def _raw(**changes: object) -> bytes:
    fields: dict[str, object] = {"v": 1, "task": TASK, "frozen": False, "freezes_in": 0.0,
                                 "categories": {"smoker": ["never"]}, "classes": ["a", "b"]}
    fields.update(changes)
    return msgpack.packb({k: v for k, v in fields.items() if v is not ...}, use_bin_type=True)


def test_the_union_holds_every_column_category_and_class_of_either() -> None:
    merged = A.union(B)
    assert merged.categories == {"site": frozenset({"east"}),
                                 "smoker": frozenset({"never", "current", "former"})}
    assert merged.classes == frozenset({"healthy", "sick"})


def test_union_is_idempotent_and_commutative() -> None:
    assert A.union(B) == B.union(A)
    assert A.union(B).union(B) == A.union(B)
    assert A.union(A) == A


def test_a_column_is_capped_at_the_smallest_values_on_every_node() -> None:
    junk = {"c": frozenset(f"v{i:04d}" for i in range(1000))}
    honest = {"c": frozenset({"a", "zzz"})}
    one, other = union(honest, junk), union(junk, honest)
    assert one == other
    assert len(one["c"]) == MAX_CATEGORIES
    assert "a" in one["c"] and "zzz" not in one["c"]


def test_classes_are_capped_too() -> None:
    many = Vocabulary(classes=frozenset(f"k{i:04d}" for i in range(MAX_CATEGORIES + 5)))
    assert len(many.union(A).classes) == MAX_CATEGORIES


def test_the_cap_is_the_tasks() -> None:
    assert MAX_CATEGORIES == tabular.MAX_CATEGORIES
    assert feature_stats.union is union  # one source for the rule


def test_a_message_round_trips_and_the_same_vocabulary_is_the_same_bytes() -> None:
    message = Message(TASK, A.union(B), frozen=True)
    assert decode(encode(message), TASK) == message
    assert encode(Message(TASK, A.union(B))) == encode(Message(TASK, B.union(A)))


def test_the_fingerprint_covers_label_columns_order_model_and_spec() -> None:
    prints = {
        TASK,
        vocabulary_fingerprint("other", ["age", "smoker"], "mlp:64"),
        vocabulary_fingerprint("outcome", ["smoker", "age"], "mlp:64"),
        vocabulary_fingerprint("outcome", ["age", "smoker"], "mlp:32"),
        vocabulary_fingerprint("outcome", ["age", "smoker"], "mlp:64", b"spec"),
    }
    assert len(prints) == 5


def test_another_tasks_vocabulary_is_refused() -> None:
    other = vocabulary_fingerprint("outcome", ["age"], "mlp:64")
    with pytest.raises(InvalidVocabulary, match="another task"):
        decode(encode(Message(other, A)), TASK)


@pytest.mark.parametrize(("data", "reason"), [
    (b"\xc1", "not a msgpack map"),
    (msgpack.packb([1, 2]), "expected the keys"),
    (_raw(extra=1), "expected the keys"),
    (_raw(frozen=...), "expected the keys"),
    (_raw(v=2), "unknown format"),
    (_raw(v=True), "unknown format"),
    (_raw(v=1.0), "unknown format"),
    (_raw(freezes_in=-1.0), "freezes_in"),
    (_raw(freezes_in=float("inf")), "freezes_in"),
    (_raw(freezes_in=1e9), "freezes_in"),
    (_raw(freezes_in=True), "freezes_in"),
    (_raw(freezes_in="3"), "freezes_in"),
    (_raw(task=b"short"), "task must be 32 bytes"),
    (_raw(task="x" * 32), "task must be 32 bytes"),
    (_raw(frozen=1), "frozen must be"),
    (_raw(categories=["smoker"]), "categories must be a map"),
    (_raw(categories={"smoker": "never"}), "at most"),
    (_raw(categories={"smoker": [1]}), "at most"),
    (_raw(categories={"s": ["x"] * (MAX_CATEGORIES + 1)}), "at most"),
    (_raw(categories={"s": ["x" * (MAX_CATEGORY_CHARS + 1)]}), "at most"),
    (_raw(categories={"c" * (MAX_CATEGORY_CHARS + 1): []}), "column name"),
    (_raw(classes="ab"), "classes"),
    (_raw(classes=[None]), "classes"),
    (b"\x00" * (MAX_VOCABULARY_MESSAGE_BYTES + 1), "exceeds"),
])
def test_every_malformed_message_is_refused_in_one_line(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidVocabulary, match=reason) as caught:
        decode(data, TASK)
    assert "\n" not in str(caught.value)


def test_serving_grows_the_union_and_answers_it() -> None:
    a = _state(A)
    answer = decode(a.serve(encode(Message(TASK, B))), TASK)
    assert answer.vocabulary == A.union(B) and not answer.frozen
    assert a.union == A.union(B) and a.served == 1


def test_a_bad_request_is_counted_and_answered_in_one_line() -> None:
    a = _state(A)
    reply = a.serve(b"junk")
    assert reply.startswith(b"refused: ") and b"\n" not in reply
    assert a.refused == 1 and a.union == A


def test_a_frozen_union_never_grows_and_says_so() -> None:
    a = _state(A)
    a.freeze()
    answer = decode(a.serve(encode(Message(TASK, B))), TASK)
    assert answer.frozen and answer.vocabulary == A and a.union == A


def test_settled_after_answers_that_add_nothing() -> None:
    a, b = _state(A, stable_after=2), _state(B)
    assert not a.settled
    a.answered(b.serve(a.request()))  # grew: not stable yet
    assert a.union == A.union(B) and not a.settled
    a.answered(b.serve(a.request()))
    assert not a.settled
    a.answered(b.serve(a.request()))
    assert a.settled and b.union == a.union


def test_growth_seen_from_a_request_restarts_the_count() -> None:
    a, b = _state(A, stable_after=1), _state(A)
    a.answered(b.serve(a.request()))
    assert a.settled
    a.serve(encode(Message(TASK, B)))  # a third member's request adds to our union
    assert not a.settled


def test_a_frozen_answer_is_adopted_as_it_is() -> None:
    network = _state(B)
    network.freeze()
    late = _state(A)
    late.answered(network.serve(late.request()))
    assert late.settled and late.adopted and late.union == B
    assert not late.union.covers(A)  # its own "current" smokers will be encoded all-zero


def test_a_refusal_answer_raises_with_the_peers_reason() -> None:
    late = _state(A)
    with pytest.raises(InvalidVocabulary, match="not a member"):
        late.answered(b"refused: not a member of this network")
    assert late.answers == 0


def test_a_files_vocabulary_follows_read_tables_column_rules(tmp_path: Path) -> None:
    path = tmp_path / "records.csv"
    path.write_text("age,smoker,outcome\n30,never,healthy\n41,current,sick\n52,never,sick\n")
    found = tabular.read_vocabulary(path, "outcome")
    assert found.columns == ("age", "smoker")
    assert found.categories == {"smoker": ("current", "never")}
    assert found.classes == ("healthy", "sick")


def test_a_category_outside_the_agreed_list_is_encoded_all_zero_and_counted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "records.csv"
    path.write_text("age,smoker,outcome\n30,never,healthy\n41,current,sick\n52,never,sick\n")
    table = tabular.read_table(path, "outcome", categories={"smoker": ("former", "never")},
                               unseen_as_zero=True)
    assert table.features == ("age", "smoker=former", "smoker=never")
    assert table.x[1].tolist() == [41.0, 0.0, 0.0]
    assert table.unseen == {"smoker": 1}
    with pytest.raises(tabular.TaskError, match="row 3, column 'smoker'"):
        tabular.read_table(path, "outcome", categories={"smoker": ("former", "never")})


def test_a_class_outside_the_agreed_classes_refuses_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "records.csv"
    path.write_text("age,outcome\n30,healthy\n41,sick\n52,severe\n")
    with pytest.raises(tabular.TaskError, match="row 4, label column 'outcome': class "
                       "'severe' is not in the network's agreed classes") as caught:
        tabular.read_table(path, "outcome", classes=("healthy", "sick"), unseen_as_zero=True)
    assert "\n" not in str(caught.value)


def test_a_column_outside_the_tasks_is_refused_in_one_counted_line() -> None:
    a = _state(A)
    for junk in ({"nosuch": frozenset({"z"})}, {"outcome": frozenset({"z"})}):
        reply = a.serve(encode(Message(TASK, Vocabulary(junk, frozenset()))))
        assert reply.startswith(b"refused: categories: column ") and b"\n" not in reply
    assert a.refused == 2 and a.served == 0 and a.union == A
    with pytest.raises(InvalidVocabulary, match="not a feature column"):
        a.answered(encode(Message(TASK, Vocabulary({"nosuch": frozenset()}), frozen=True)))
    assert a.union == A and not a.adopted and a.answers == 0


def test_the_union_never_holds_more_columns_than_the_task() -> None:
    a = _state(A)
    for k in range(3):
        junk = {f"c{k}_{i}": frozenset({"v"}) for i in range(4_096)}
        assert a.serve(encode(Message(TASK, Vocabulary(junk, frozenset())))).startswith(
            b"refused: ")
    a.serve(encode(Message(TASK, B)))
    assert set(a.union.categories) <= set(COLUMNS)
    assert decode(a.request(), TASK).vocabulary == a.union  # peers can read our answer


def test_a_request_past_the_cap_is_refused_and_evicts_nothing() -> None:
    a = _state(A)
    junk = frozenset(f"!{i:03}" for i in range(MAX_CATEGORIES))
    for evil in (Vocabulary({"smoker": junk}, frozenset()), Vocabulary({}, junk)):
        reply = a.serve(encode(Message(TASK, evil)))
        assert reply.startswith(b"refused: ") and b"more than 256" in reply
    assert a.union == A and a.refused == 2
    # Up to the cap is taken: junk can be added, never replace what was agreed.
    a.serve(encode(Message(TASK, Vocabulary({"smoker": frozenset(sorted(junk)[:254])}))))
    assert len(a.union.categories["smoker"]) == MAX_CATEGORIES
    assert A.categories["smoker"] <= a.union.categories["smoker"]
    with pytest.raises(InvalidVocabulary, match="more than 256"):
        a.answered(encode(Message(TASK, Vocabulary({}, junk))))
    assert a.union.classes == A.classes and a.answers == 0


def test_an_adopted_union_is_answered_frozen() -> None:
    network = _state(B)
    network.freeze()
    b = _state(A)
    b.answered(network.serve(b.request()))
    assert b.adopted and not b.frozen
    assert decode(b.serve(encode(Message(TASK, A))), TASK).frozen


def test_an_answer_says_how_long_its_senders_window_has_left() -> None:
    a, b = _state(A), _state(B)
    a.freeze_at = 30.0
    answer = decode(a.serve(b.request(), now=12.5), TASK)
    assert answer.freezes_in == 17.5 and not answer.frozen
    b.answered(a.serve(b.request(), now=12.5), now=100.0)  # b's clock is its own
    assert b.peer_freeze_at == 117.5
    a.freeze()
    assert decode(a.request(now=12.5), TASK).freezes_in == 0.0
