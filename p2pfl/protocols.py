"""The daemon's own libp2p protocols (peer exchange and reachability name theirs)."""

# 1.2.0: an update is offered (prefix and header) before its payloads are sent, and
# a share is refunded only on a refusal of the offer (gossip/delivery.py).
UPDATE_PROTOCOL = "/p2pfl/update/1.2.0"
# A joining node asks members for a signed snapshot of their model.
MODEL_PROTOCOL = "/p2pfl/model/1.0.0"
# Before the first round, members agree on feature statistics (p2pfl/feature_stats.py).
FEATURE_STATS_PROTOCOL = "/p2pfl/feature-stats/1.0.0"
# Before a csv task's model is built, members agree on its categories and classes
# (p2pfl/vocabulary.py); a running node answers its frozen union.
VOCABULARY_PROTOCOL = "/p2pfl/vocabulary/1.0.0"
