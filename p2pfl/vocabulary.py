"""The vocabulary agreement over ``/p2pfl/vocabulary/1.0.0``, before a CSV task's model exists.

The rule is gossip's (:class:`gossip.vocabulary.VocabularyState`); this module
reads the node's table once, runs a short ``trio.run`` with a libp2p host on
the node's own ``--listen`` address and key, and carries the messages:

* a node with ``--bootstrap`` sends its union to each bootstrap peer every
  :data:`EXCHANGE_INTERVAL_S` and takes the answer (the peer's union after
  taking ours), until a peer answers with a *frozen* union (its window is over:
  that union is adopted as it is), or ``--vocabulary-wait`` plus
  :data:`FREEZE_GRACE_S` is over, extended to a peer's announced freeze
  (``freezes_in``) plus the grace, but never past twice the wait plus the grace;
  then the union as it stands is used for this run (not saved), and the log
  says whether it had been stable for :data:`STABLE_EXCHANGES` answers.
  Waiting for the freeze, rather than stopping once the union looks stable,
  is what makes members that join the first member's window agree: B may
  look stable before C's categories reach A, and a B that stopped then would
  build a narrower model than A and C. It costs B nothing, since A's daemon,
  which B is to gossip with, is not up before A's window ends either;
* a node without one (the first member) serves the protocol for the whole
  window, so that others bootstrap off it, and then starts; with
  ``--min-neighbours 0`` (alone by design) it does not wait.

Then the union is *frozen*: the daemon (NodeRuntime) keeps answering the
protocol with it and never grows it again, so a member started later adopts
the network's vocabulary as it is (a category it holds that the network lacks
is encoded all-zero and logged; a class the network lacks refuses to start,
since its rows cannot be trained on). A frozen union (adopted, or the first
member's own) is saved in the state directory (p2pfl/vocabulary_store.py), so
a restarted node builds the same model as before without asking;
a node whose state directory holds a checkpoint but no saved union (written
before this agreement existed) keeps its own file's vocabulary, so it resumes.

Who may contribute: with ``--allow`` or ``--network`` the host refuses every
stream of a non-member before reading it (p2pfl.inbound), and the handler
checks again; under ``--network`` the node shows its certificate to each
bootstrap peer first (``/p2pfl/members/1.0.0``), as the daemon does.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from fltasks.models import parse_model
from fltasks.tabular import DEFAULT_TABULAR_MODEL, agreed_order, read_vocabulary
from gossip.vocabulary import (
    FREEZE_GRACE_S,
    MAX_VOCABULARY_MESSAGE_BYTES,
    STABLE_EXCHANGES,
    InvalidVocabulary,
    Vocabulary,
    VocabularyState,
    vocabulary_fingerprint,
)
from p2pfl.allowlist import allow_file_peers
from p2pfl.host import split_peer_multiaddr
from p2pfl.member_service import MemberService, member_service
from p2pfl.member_source import MemberSource
from p2pfl.protocols import VOCABULARY_PROTOCOL
from p2pfl.streams import TransportError
from p2pfl.transport import Transport
from p2pfl.vocabulary_store import VOCABULARY_FILE, restore, save

if TYPE_CHECKING:
    from gossip.keys import NodeKey
    from p2pfl.config import NodeConfig
    from p2pfl.inbound import Handler

__all__ = ["FREEZE_GRACE_S", "STABLE_EXCHANGES", "VOCABULARY_FILE", "Agreed",
           "agree_vocabulary", "local_state", "serve_frozen", "wanted"]

logger = logging.getLogger(__name__)

# Between exchanges with the bootstrap peers: a few KB each, to one or two peers.
EXCHANGE_INTERVAL_S = 0.25


def wanted(config: NodeConfig) -> bool:
    """A csv task without a task spec (whose classes and input shape already fix the model),
    and the agreement not turned off with ``--vocabulary-wait 0``."""
    return (config.task.startswith("csv:") and config.task_spec is None
            and config.label is not None and config.vocabulary_wait > 0)


@dataclass(frozen=True)
class Agreed:
    """How the agreement ended: the frozen state, the listen addresses the phase bound
    (the daemon keeps their ports), and how many peers answered."""

    state: VocabularyState
    listen: tuple[str, ...]
    peers: int
    restored: bool = False

    def for_task(self) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
        """``load_task``'s ``vocabulary``: the classes and categories in encoding order."""
        union = self.state.union
        return (agreed_order(union.classes),
                {column: agreed_order(values) for column, values in union.categories.items()})


def local_state(config: NodeConfig) -> VocabularyState:
    """This node's own vocabulary, the fingerprint of what must match to mix it, and the
    feature columns a peer's message may name."""
    assert config.label is not None
    path = config.task.partition(":")[2]
    table = read_vocabulary(path, config.label)
    model = str(parse_model(config.model or DEFAULT_TABULAR_MODEL))
    fingerprint = vocabulary_fingerprint(config.label, table.columns, model)
    categories = {column: frozenset(values) for column, values in table.categories.items()}
    return VocabularyState(Vocabulary(categories, frozenset(table.classes)), fingerprint,
                           table.columns, config.label)


def agree_vocabulary(config: NodeConfig, key: NodeKey) -> Agreed:
    """Agree with the bootstrap peers (or serve them) within ``--vocabulary-wait``.

    TaskError for a file that cannot be read, TransportError for a listen address
    that cannot be bound; the caller turns both into one line."""
    state = local_state(config)
    saved = restore(config.state_dir, state)
    if saved is not None:
        state.union = saved
        state.freeze()
        agreed = Agreed(state, config.listen, 0, restored=True)
    else:
        try:
            listen, peers = trio.run(_phase, config, key, state)
        except BaseExceptionGroup as group:
            cause = _sole_cause(group)
            if isinstance(cause, (TransportError, OSError)):  # e.g. the port is taken
                raise TransportError(str(cause)) from None
            raise
        state.freeze()
        if state.adopted or not config.bootstrap:  # a frozen union: the network's
            save(config.state_dir, state)
        else:
            logger.warning("vocabulary: the union as it stands is used for this run and not "
                           "saved (no bootstrap peer's union was frozen); the next start "
                           "agrees again")
        agreed = Agreed(state, _keep_ports(config.listen, listen), peers)
    logger.info("%s", describe(agreed))
    return agreed


def _sole_cause(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def describe(agreed: Agreed) -> str:
    """One log line: what was agreed, with whom, and what the union added to our file's."""
    state = agreed.state
    union, own = state.union, state.own
    columns = ", ".join(f"{name} ({len(values)})" for name, values in union.categories.items())
    added = sum(len(values - own.categories.get(name, frozenset()))
                for name, values in union.categories.items())
    new_classes = len(union.classes - own.classes)
    how = ("restored from the state directory" if agreed.restored
           else "adopted a bootstrap peer's frozen union" if state.adopted
           else f"{agreed.peers} peers answered, {state.served} requests served")
    change = (f"the union added {added} categories and {new_classes} classes to this file's"
              if added or new_classes else "the union added nothing to this file's")
    missing = "" if union.covers(own) else "; some of this file's are not in it (all-zero)"
    return (f"vocabulary agreed ({how}): {len(union.categories)} categorical columns "
            f"[{columns or 'none'}], {len(union.classes)} classes; {change}{missing}")


def _keep_ports(configured: tuple[str, ...], bound: list[str]) -> tuple[str, ...]:
    """The daemon listens where the phase did, so that ``tcp/0`` keeps its port and peers
    that bootstrapped off the phase find the daemon at the same address."""
    if len(bound) != len(configured):
        return configured  # e.g. 0.0.0.0 expanded into interfaces: leave it to the daemon
    return tuple(str(split_peer_multiaddr(addr)[1]) for addr in bound)


def _members(config: NodeConfig, key: NodeKey) -> tuple[MemberSource | None,
                                                       MemberService | None]:
    service = member_service(config, key, lambda line: None)
    if service is not None:
        return service.source, service
    return (MemberSource(allow_file_peers(config.allow)) if config.allow else None), None


def serve_frozen(state: VocabularyState, members: MemberSource | None) -> Handler:
    """The handler: answer our union (growing it only before the freeze); members only."""

    async def handle(peer_id: str, payload: bytes) -> bytes:
        if members is not None and peer_id not in members:
            return state.refuse("not a member of this network")
        reply = state.serve(payload, trio.current_time())
        if reply.startswith(b"refused:"):
            logger.debug("vocabulary request of %s refused: %s", peer_id, state.last_refusal)
        return reply

    return handle


async def _phase(config: NodeConfig, key: NodeKey, state: VocabularyState
                 ) -> tuple[list[str], int]:
    members, service = _members(config, key)
    timeout = config.deadlines.handshake
    repeats = _RepeatsAtDebug()
    libp2p = logging.getLogger("p2pfl.libp2p")
    libp2p.addFilter(repeats)
    try:
        return await _listen_and_agree(config, key, state, members, service, timeout)
    finally:
        libp2p.removeFilter(repeats)


class _RepeatsAtDebug(logging.Filter):
    """libp2p warns at every failed dial (every :data:`EXCHANGE_INTERVAL_S`, backoff
    permitting, while a bootstrap peer is down): each line once, its repeats at debug."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = record.getMessage()
            if message in self.seen:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            self.seen.add(message)
        return True


async def _listen_and_agree(config: NodeConfig, key: NodeKey, state: VocabularyState,
                            members: MemberSource | None, service: MemberService | None,
                            timeout: float) -> tuple[list[str], int]:
    answered: set[str] = set()
    async with Transport.open(key, config.listen, allowed_peers=members,
                              handshake_timeout=timeout) as transport:
        if service is not None:
            service.serve(transport, config.read_timeout)
        transport.set_handler(VOCABULARY_PROTOCOL, serve_frozen(state, members),
                              MAX_VOCABULARY_MESSAGE_BYTES, config.read_timeout)
        bound = transport.listen_addrs
        wait = config.vocabulary_wait
        grace = FREEZE_GRACE_S if config.bootstrap else 0.0
        alone = not config.bootstrap and config.min_neighbours == 0
        start = trio.current_time()
        if not alone:
            later = (f" (up to {2 * wait + grace:g} s if a peer's window ends later)"
                     if config.bootstrap else "")
            logger.info("vocabulary: agreeing with %s for %g s%s, listening on %s",
                        "the bootstrap peers" if config.bootstrap else "whoever bootstraps off us",
                        wait + grace, later, ", ".join(bound))
        with trio.move_on_after(wait + grace) as window:
            state.freeze_at = window.deadline
            if config.bootstrap:
                limit = start + 2 * wait + grace
                await _agree(transport, service, config.bootstrap, state, answered, timeout,
                             window, limit)
            elif not alone:
                await trio.sleep_forever()  # serve those who bootstrap off us
            # else: alone by design (as feature statistics), nobody to wait for
        waited = trio.current_time() - start
        if config.bootstrap and not answered:
            logger.warning("vocabulary: no bootstrap peer answered within %.3g s; building the "
                           "model over this file's categories and classes only", waited)
        elif config.bootstrap and not state.adopted:
            logger.warning("vocabulary: no bootstrap peer answered with a frozen union within "
                           "%.3g s; using the union as it stands (%s)", waited,
                           "stable" if state.settled else "still growing")
    return bound, len(answered)


async def _agree(transport: Transport, service: MemberService | None,
                 bootstrap: tuple[str, ...], state: VocabularyState, answered: set[str],
                 timeout: float, window: trio.CancelScope, limit: float) -> None:
    """Exchange with every bootstrap peer until one answers frozen (``window`` bounds it).

    A peer whose window ends later than ours (it started after us) says so in its
    answers: ours is then extended to its freeze plus the grace, never past ``limit``."""
    failed: set[str] = set()
    while True:
        for addr in bootstrap:
            await _exchange(transport, service, addr, state, answered, failed, timeout)
            if state.adopted:
                return
            if state.peer_freeze_at is not None:
                window.deadline = min(max(window.deadline, state.peer_freeze_at + FREEZE_GRACE_S),
                                      limit)
                state.freeze_at = window.deadline
        await trio.sleep(EXCHANGE_INTERVAL_S)


async def _exchange(transport: Transport, service: MemberService | None, addr: str,
                    state: VocabularyState, answered: set[str], failed: set[str],
                    timeout: float) -> None:
    """One exchange with ``addr``: connect, certificate (first time), request, all within
    one ``timeout`` (docs/PROTOCOL.md). The first failure per peer is a warning, later
    ones (every :data:`EXCHANGE_INTERVAL_S` while it is down) are debug."""
    peer = ""
    with trio.move_on_after(timeout) as exchange:
        def left() -> float:
            return max(exchange.deadline - trio.current_time(), 0.001)
        try:
            peer = await transport.connect(addr, left(), persistent=True)
            if service is not None and peer not in answered:
                await service.sync_with(peer, left())  # show our certificate first
            reply = await transport.request(peer, VOCABULARY_PROTOCOL,
                                            state.request(trio.current_time()), left(),
                                            MAX_VOCABULARY_MESSAGE_BYTES)
            state.answered(reply, trio.current_time())
        except (TransportError, InvalidVocabulary) as error:
            _failed(addr, error, failed)
            return
    if exchange.cancelled_caught:
        _failed(addr, f"no answer within {timeout:g} s", failed)
        return
    answered.add(peer)


def _failed(addr: str, error: object, failed: set[str]) -> None:
    if addr in failed:
        logger.debug("vocabulary exchange with %s failed: %s", addr, error)
    else:  # once per peer: it will say the same every time
        failed.add(addr)
        logger.warning("vocabulary: exchange with %s failed: %s", addr, error)


def with_listen(config: NodeConfig, agreed: Agreed) -> NodeConfig:
    """``config`` listening where the phase did."""
    return dataclasses.replace(config, listen=agreed.listen)
