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

import numpy as np

from gossip.compression.base import TensorCodec


def round_trip(codec: TensorCodec, array: np.ndarray) -> np.ndarray:
    """What a receiver decodes when ``array`` is sent with ``codec``."""
    payload = bytearray(codec.payload_size(array))
    codec.encode_into(array, memoryview(payload))
    return codec.decode(memoryview(payload), array.dtype, array.shape)


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
        wanted = np.asarray(vector, dtype=np.float64)
        if self.memory is not None:
            if self.memory.shape != wanted.shape:
                raise ValueError(
                    f"error feedback holds a residual of shape {self.memory.shape}, "
                    f"got a tensor of shape {wanted.shape}; use one ErrorFeedback per tensor"
                )
            wanted = wanted + self.memory
        transmitted = round_trip(self.codec, wanted.astype(vector.dtype))
        self.memory = wanted - transmitted
        return transmitted

    def reset(self) -> None:
        """Forget the residual (after the model was replaced, e.g. by adopting a snapshot)."""
        self.memory = None
