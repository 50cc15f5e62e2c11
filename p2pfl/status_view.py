"""The /status dict: a pure view of a running node's parts (served by p2pfl/status.py).

Its keys are documented in docs/STATUS.md, versioned by ``schema_version``; tests,
the benchmarks, the lab and the web page read them, so a key is never renamed here
alone: a rename or removal bumps STATUS_SCHEMA_VERSION, a new key does not.
"""

from __future__ import annotations

import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from gossip.keys import peer_id_from_public_key
from p2pfl.protocols import UPDATE_PROTOCOL
from p2pfl.reachability import status_view as reachability_view

if TYPE_CHECKING:
    from p2pfl.runtime import NodeRuntime

STATUS_SCHEMA_VERSION = 1
# The page draws the peer book; past this many ids only the count is exact.
MAX_PEER_BOOK_IDS = 64

try:
    VERSION = version("p2pfl-gossip")
except PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "unknown"


def node_status(node: NodeRuntime) -> dict[str, Any]:
    """What a node reports: its round, links, pushes, rejections, mass and privacy."""
    transport = node.membership.transport
    view = node.core.view
    counters = view["counters"]
    policy = node.policy
    rejected: Counter[str] = Counter(counters["rejected"])
    rejected.update(node.inbound.refused_updates)
    if transport is not None:
        rejected.update(transport.frame_errors)
        for reason in ("busy", "rate-limited"):
            if transport.stream_errors.get(reason):
                rejected[reason] += transport.stream_errors[reason]
        # A non-member's update stream is refused unread: its sender is unknown.
        if transport.streams_refused.get(UPDATE_PROTOCOL):
            rejected["unknown-sender"] += transport.streams_refused[UPDATE_PROTOCOL]
    config, rounds, budget = node.config, node.rounds, node.budget
    known = policy.book.known()
    return {
        "schema_version": STATUS_SCHEMA_VERSION,
        "version": VERSION,
        "peer_id": node.key.peer_id,
        "addrs": transport.addrs if transport else [],
        # Each address's kind (public, nated, firewalled, relayed), our relays, and
        # the peers we reach through a relay (p2pfl/reachability.py).
        "reachability": reachability_view(transport, node.membership.reachability),
        # Our relay service: what it granted, carried, refused and cut, by reason.
        "relay": transport.nat.policy.view() if transport and transport.nat else None,
        "round": rounds.round,
        "neighbours": list(node.membership.neighbours),
        "accuracy": rounds.accuracy,
        # The last round's mean training loss on this node's shard (null before one,
        # or when the task's train step reports none, e.g. under --dp sample).
        "train_loss": node.training.last_loss,
        "updates_sent": policy.updates_sent,
        "updates_accepted": counters["accepted"],
        # training, then serving: finished its rounds, still gossiping (--linger);
        # dp-exhausted: --dp-target-epsilon reached, merging and serving only
        "state": rounds.state_name(),
        # Fresh neighbour votes, robust merges with a quorum or bounded below one,
        # and pushes that arrived before the sender's previous one was merged.
        "votes": counters["votes"],
        "merges": counters["merges"],
        "coalesced": counters["coalesced"],
        "updates_rejected": dict(rejected),
        "bytes_sent": transport.bytes_sent if transport else 0,
        "bytes_received": transport.bytes_received if transport else 0,
        "uptime_s": round(time.monotonic() - node.started, 3),
        "samples": node.training.samples,
        "weight": view["weight"],
        # Where the rest of the push-sum mass is: received shares not merged yet,
        # and shares being pushed (from the split until refunded or given;
        # gossip/delivery.py). On every poll, weight + weight_pending +
        # weight_in_flight is this node's part of the mass; summed over all nodes it
        # stays at their starting total unless shares are lost (docs/PROTOCOL.md §4).
        "weight_pending": view["weight_pending"],
        "weight_in_flight": policy.weight_in_flight,
        "sequence": view["sequence"],
        "known_peers": len(policy.book),
        "peer_book": sorted(known)[:MAX_PEER_BOOK_IDS],
        # Per sender that pushed to us lately (our in-neighbours): verdicts, last heard.
        "in_peers": node.inbound.by_peer.view(time.monotonic()),
        # Neighbour -> weight of the share being pushed to it now (held until its receipt).
        "held_shares": dict(policy.in_flight),
        # Known peers that could not be dialled lately (kept, redialled by discovery).
        "peers_unreachable": policy.unreachable_count(),
        # Highest sequence accepted from each sender: shows whose updates get through.
        "last_seq": {
            peer_id_from_public_key(sender): seq for sender, seq in view["last_seq"].items()
        },
        "send_failures": dict(policy.send_failures),
        # Measured links (p2pfl/linkrates.py): the Mbit/s deadlines assume, for our
        # pushes to them and for their frames to us.
        "link_mbit": {
            direction: {peer: round(r * 8 / 1e6, 3) for peer, r in rates.rates.items()}
            for direction, rates in (("push", policy.push_rates), ("read", policy.read_rates))
        },
        # What became of pushed shares: delivered, refunded, disputed, unanswered
        # (docs/PROTOCOL.md §4); and per peer, refusals after the payloads.
        "deliveries": dict(policy.deliveries.counts),
        "disputed_by": dict(policy.deliveries.disputes),
        "pushes_refused": dict(policy.pushes_refused),
        "pushes_in_flight": len(policy.in_flight),
        # Peers that answered no receipt (probed with weight 0), drops, recoveries, and
        # the shares counted as lost to silence (p2pfl/silence.py).
        "silence": {"silent": policy.silence.count(), "dropped": policy.silence.dropped_count,
                    "recovered": policy.silence.recovered_count,
                    "weight_lost": policy.silence.weight_lost},
        # Rounds follow the network (p2pfl/pacing.py): merges that went on without
        # every live in-neighbour's share, the bound having passed.
        "mix_waited_out": rounds.pace.waited_out,
        # top-k: pushes that carried the link's whole copy afresh (peer not in step)
        "whole_copies_sent": policy.whole_copies_sent,
        "streams_refused": dict(transport.streams_refused) if transport else {},
        # Streams reset or closed unanswered, by reason (busy, rate-limited, reach-malformed, ...).
        "stream_errors": dict(transport.stream_errors) if transport else {},
        # Connections cut before any stream (p2pfl.gating), by reason.
        "connections_refused": dict(transport.connections_refused) if transport else {},
        # Checkpoint writes that failed, by errno name (the node kept running).
        "checkpoint_failures": dict(node.store.failures),
        "aggregator": node.gossip.aggregator.name,
        "compression": node.gossip.codec_id,
        # The members whose median model this node started from when it joined.
        "adopted_from": node.joining.adopted_from,
        "join_refused": dict(node.joining.join_refused),
        # How the feature scaling was agreed (p2pfl/feature_stats.py), and rescales since.
        "feature_stats": {"outcome": node.stats.outcome, "rescaled": node.stats.rescaled,
                          "refused": node.stats.refused},
        # The csv vocabulary agreed before the model was built (p2pfl/vocabulary.py):
        # requests served since, and refused (malformed, another task, non-member).
        "vocabulary": None if node.vocabulary is None else {
            "columns": {name: len(values)
                        for name, values in node.vocabulary.union.categories.items()},
            "classes": len(node.vocabulary.union.classes),
            "served": node.vocabulary.served, "refused": node.vocabulary.refused},
        "attack": config.attack,
        "dp": config.dp_mode,
        "epsilon": budget.epsilon,
        "delta": config.dp_delta if config.dp_enabled else None,
        "dp_target_epsilon": config.dp_target_epsilon,
        "dp_exhausted": budget.exhausted,
        "task": node.training.task.name,
        # The last round's seconds per phase, peak RSS, the loop's worst stall.
        "phases": node.phases.status(),
        # Who is a member (issue 22): the network id, our certificate's expiry and
        # signers, the revocation log's head, members known, refusals by reason.
        "membership": membership_view(node),
    }


def membership_view(node: NodeRuntime) -> dict[str, Any] | None:
    if node.member_service is not None:
        return node.member_service.status()
    members = node.membership.members
    if members is None:
        return None
    return {"allow_file": node.config.allow, "members_known": len(members)}
