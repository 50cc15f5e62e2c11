"""The p2pfl node, and the Python API to its trained model.

    import p2pfl
    model, card = p2pfl.load_model("state")   # a node's --state-dir
    x = model.inputs_of("csv:new.csv")        # raw rows, as the model takes them
    probabilities = model(x)                  # [rows, classes], preprocessing inside
    print(model.classes[int(probabilities[0].argmax())])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pfl.trained_model import Predictor

__all__ = ["load_model"]


def load_model(state_dir: str | Path) -> tuple[Predictor, str]:
    """The node's model as a torch module in eval mode with its preprocessing, and its card.

    The module takes a task's raw inputs (``inputs_of``) and returns class
    probabilities; the card is the Markdown ``p2pfl export`` writes. A state dir
    without a usable model raises ValueError with one line naming the fix.
    """
    # Imported here: `import p2pfl` stays cheap for the daemon's own modules.
    from p2pfl.model_card import model_card
    from p2pfl.trained_model import load_trained

    trained = load_trained(state_dir)
    return trained.predictor(), model_card(trained, f"{Path(state_dir).name} (in memory)",
                                           "a torch module")
