"""The agreed vocabulary in the state directory (``vocabulary.msgpack``), for p2pfl/vocabulary.py.

A frozen union (adopted from a bootstrap peer, or this node's own when it is the
first member and its window ended) is saved, so that a restarted node builds the
same model without asking. A union used only because the wait ran out before a
bootstrap peer froze is never saved: the next start agrees again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gossip.vocabulary import (
    InvalidVocabulary,
    Message,
    Vocabulary,
    VocabularyState,
    decode,
    encode,
)
from p2pfl.checkpoint import FILE_NAME as CHECKPOINT_FILE
from p2pfl.member_store import write_atomically

__all__ = ["VOCABULARY_FILE", "restore", "save"]

logger = logging.getLogger(__name__)

VOCABULARY_FILE = "vocabulary.msgpack"


def restore(state_dir: str, state: VocabularyState) -> Vocabulary | None:
    """The saved union, the file's own vocabulary for a checkpoint from before the
    agreement, or None (agree again). ValueError, one line naming both files, for a
    saved union that cannot be read next to a checkpoint: agreeing again could build
    another shape than the checkpoint's, and the file's own could too."""
    path = Path(state_dir) / VOCABULARY_FILE
    checkpoint = Path(state_dir) / CHECKPOINT_FILE
    try:
        saved = decode(path.read_bytes(), state.fingerprint).vocabulary
        state.check(saved)
        return saved
    except FileNotFoundError:
        pass
    except (OSError, InvalidVocabulary) as error:
        if checkpoint.exists():
            raise ValueError(f"{path}: cannot be read ({error}), and {checkpoint} was trained "
                             f"over it: restore the file, or delete both to agree again"
                             ) from None
        logger.warning("vocabulary: ignoring %s (%s); agreeing again", path, error)
        return None
    if checkpoint.exists():
        # A checkpoint written before this agreement existed holds a model over this
        # file's own vocabulary: keep that shape, or the restart could not resume.
        return state.own
    return None


def save(state_dir: str, state: VocabularyState) -> None:
    """Write the frozen union atomically (owner-only)."""
    write_atomically(Path(state_dir) / VOCABULARY_FILE,
                     encode(Message(state.fingerprint, state.union, frozen=True)), 0o600)
