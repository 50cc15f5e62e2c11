"""Error feedback: what a lossy codec drops now is added to what is sent next.

A lossy codec (rounding to fp16 or int8) drops part of every message; sent
on its own, the dropped part is lost for good and averaging drifts. With error feedback
(EF-SGD, Karimireddy et al., ICML 2019; the same memory as in CHOCO-SGD,
Koloskova et al., ICML 2019) the sender keeps the residual ``e`` and sends
``C(v + e)``, then keeps ``e <- v + e - C(v + e)``. For a fixed ``v`` the
residual stays bounded, so the mean of what was sent over t messages is
``v - e_t / t``: no part of ``v`` is lost, only delayed.

Where it is used. The dense lossy codecs (``fp16``, ``int8``) compress the
whole message vector (the sender's estimate, in each tensor's own dtype,
exactly as the wire carries it) with this memory
(:class:`gossip.encoders.FeedbackEncoder`): each message is within a small
relative error of the estimate, and the memory removes even that bias over
time, so push-sum's receivers can fold in each message's whole estimate with
its weight as usual. A refund (a failed delivery) does not rewind the
memory: the sender gets its exact share back and the memory holds the error
of a message nobody saw, a bounded extra that the next messages carry.

``topk`` does not use this class: a mostly-zero whole estimate cannot be
averaged, so it sends differences to a public copy that every receiver holds
(:mod:`gossip.public_copy`, as in CHOCO-SGD), and the residual ``z - x̂``
there plays the part of this memory. Only :func:`round_trip` is shared.

One :class:`ErrorFeedback` per tensor, since each tensor is encoded on its
own; the memory is float64 whatever the tensor's dtype, so the rounding to
that dtype is fed back too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gossip.compression.base import TensorCodec


def round_trip(codec: TensorCodec, array: np.ndarray) -> np.ndarray:
    """What a receiver decodes when ``array`` is sent with ``codec``."""
    payload = bytearray(codec.payload_size(array))
    codec.encode_into(array, memoryview(payload))
    return codec.decode(memoryview(payload), array.dtype, array.shape)


def feedback_step(
    vector: np.ndarray,
    memory: np.ndarray | None,
    round_trip: Callable[[np.ndarray], np.ndarray],
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One message under error feedback: ``(what is transmitted, the new memory)``.

    The one definition of the rule, for one tensor (:class:`ErrorFeedback`, the
    daemon's) and for every node's row at once (the simulator's
    :class:`topologies.compression.Compressor`). ``vector`` is what to convey, in
    the dtype the wire carries; ``memory`` the float64 residual of the same
    shape, or None before the first message (then nothing is added, not even a
    zero, which would turn a -0.0 into +0.0 on the wire); ``round_trip`` what a
    receiver decodes for an array. Sent: ``round_trip(vector + memory)`` cast to
    ``vector``'s dtype; memory: the float64 sum minus that, so the cast's
    rounding is fed back too. ``rows`` (bool [n], for [n, P] vectors): only
    these rows add and update memory (the simulator's honest senders); the
    others send their vector as it is and keep their memory.
    """
    wanted = np.asarray(vector, dtype=np.float64)
    if memory is not None:
        if memory.shape != wanted.shape:
            raise ValueError(
                f"error feedback holds a residual of shape {memory.shape}, "
                f"got a tensor of shape {wanted.shape}; use one ErrorFeedback per tensor"
            )
        with_memory = wanted + memory
        wanted = with_memory if rows is None else np.where(rows[:, None], with_memory, wanted)
    transmitted = round_trip(wanted.astype(vector.dtype))
    residual = wanted - transmitted
    if rows is not None:
        kept = np.zeros_like(residual) if memory is None else memory
        residual = np.where(rows[:, None], residual, kept)
    return transmitted, residual


class ErrorFeedback:
    """Sender-side residual memory around one lossy codec, for one tensor."""

    def __init__(self, codec: TensorCodec) -> None:
        self.codec = codec
        self.memory: np.ndarray | None = None

    def compress(self, vector: np.ndarray) -> np.ndarray:
        """The tensor to send for ``vector``: already what the receiver will decode.

        The returned array is ``codec``'s decoding of ``vector`` plus the
        residual memory, in ``vector``'s dtype and shape; the memory becomes
        the part of that sum the message did not carry.
        """
        codec = self.codec
        transmitted, self.memory = feedback_step(
            vector, self.memory, lambda array: round_trip(codec, array)
        )
        return transmitted

    def reset(self) -> None:
        """Forget the residual (after the model was replaced, e.g. by adopting a snapshot)."""
        self.memory = None
