"""The step guard: a local training step that wrecks the model is dropped, not gossiped.

What it judges, and why only that: the guard compares the model this node's
own training produced (``after``) with the model that training started from
(``before``), both on the node's own held-out split. ``before`` already holds
every neighbour's contribution merged so far, so the guard never judges a merged
model, and so:

* it cannot reject honest-but-different neighbours: a non-IID neighbour that
  lowers our held-out accuracy does so in the merge, which is in ``before``
  and is never rolled back;
* it cannot hide a Byzantine neighbour's poison: a poisoned merge lowers
  ``before`` too, the accuracy the node reports (after its merge, every round)
  shows the damage, and the step from a poisoned ``before`` is not "far worse
  than where it started", so it is taken as usual. Defending against poison is
  the robust aggregation's job (gossip/robust.py), on votes, not this guard's.

The "last good model" a rejected step falls back to is therefore ``before``.
A step is judged far worse when it loses more than ``MAX_ACCURACY_DROP`` of
held-out accuracy, or when its held-out loss grows past ``MAX_LOSS_RATIO``
times and ``MIN_LOSS_RISE`` above the starting loss (both, so that a loss
going from 0.01 to 0.03 is not a collapse), or when it is not finite.

Under DP the guard is off: choosing whether to release a step from a private
held-out evaluation is itself a release that no accountant here counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Measured (issue 23): the collapse this guards against lost 0.75 in one step;
# a healthy epoch of SGD on the tasks here moves held-out accuracy by < 0.1.
MAX_ACCURACY_DROP = 0.2
MAX_LOSS_RATIO = 3.0
MIN_LOSS_RISE = 0.5


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str = ""


def judge_step(before: tuple[float, float], after: tuple[float, float]) -> Verdict:
    """Keep or drop a local step from its (accuracy, loss) before and after, held out."""
    acc_before, loss_before = before
    acc_after, loss_after = after
    if not (math.isfinite(loss_after) and math.isfinite(acc_after)):
        return Verdict(False, "the trained model's held-out loss is not finite")
    if acc_before - acc_after > MAX_ACCURACY_DROP:
        return Verdict(False, f"held-out accuracy fell from {acc_before:.4f} to "
                              f"{acc_after:.4f} in one local step")
    if (math.isfinite(loss_before) and loss_after > MAX_LOSS_RATIO * loss_before
            and loss_after - loss_before > MIN_LOSS_RISE):
        return Verdict(False, f"held-out loss rose from {loss_before:.4f} to "
                              f"{loss_after:.4f} in one local step")
    return Verdict(True)
