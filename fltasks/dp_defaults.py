"""The defaults of ``--dp sample`` (DP-SGD), declared once for the daemon and the simulator.

Kept apart from fltasks/dp_sgd.py so that reading them does not import opacus.
Chosen from the simulator and confirmed on real daemons (docs/PRIVACY.md):

* ``DP_SGD_LR``: DP-SGD steps along a clipped mean gradient plus noise, so
  its step is at most ``lr * C`` plus noise; at the task's own non-private
  rate (0.1) the noisy steps were too short to learn in 40 rounds (digits, 8
  nodes, epsilon 7.58: 0.803 at lr 0.1 against 0.895 at lr 1,
  scripts/sweep_dp.py). What mattered was ``lr * C``: lr 1 with C 1 and
  lr 3 with C 0.3 gave about the same (0.895, 0.904), lr 3 with C 1 overshot.
* ``DP_SGD_CLIP``: 1, with the rate above.
* ``DP_SGD_NOISE``: sigma 2; the epsilon a run spends also depends on the
  rounds and the node's sample rate (batch / records): ``--dp-target-epsilon``
  bounds it, and given with ``--rounds`` and no ``--dp-noise`` it chooses
  the noise that spends it in those rounds (:func:`noise_for_target`).
"""

from __future__ import annotations

DP_SGD_LR = 1.0
DP_SGD_CLIP = 1.0
DP_SGD_NOISE = 2.0
