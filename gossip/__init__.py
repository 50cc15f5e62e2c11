"""The gossip protocol, sans-I/O: signed updates, admission and averaging.

No sockets, no trio, no sleeping and no wall clock: callers pass bytes and
time in and carry out what comes back, so the same rules run in the libp2p
daemon, in the simulator and in microsecond-fast tests.
"""

from gossip.admission import Accepted, Admission, AdmissionPolicy, Rejected, Verdict
from gossip.codec import decode, encode
from gossip.errors import InvalidUpdate, Reason
from gossip.keys import KeyFileError, NodeKey, peer_id_from_public_key
from gossip.layout import ModelLayout, TensorSpec, model_fingerprint
from gossip.node import GossipNode, Outgoing
from gossip.pushsum import PushSum, Share
from gossip.update import Update

__all__ = [
    "Accepted",
    "Admission",
    "AdmissionPolicy",
    "GossipNode",
    "InvalidUpdate",
    "KeyFileError",
    "ModelLayout",
    "NodeKey",
    "Outgoing",
    "PushSum",
    "Reason",
    "Rejected",
    "Share",
    "TensorSpec",
    "Update",
    "Verdict",
    "decode",
    "encode",
    "model_fingerprint",
    "peer_id_from_public_key",
]
