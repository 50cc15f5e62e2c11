"""The model card: a Markdown page written beside every export, from the same metadata.

It says what the model is, how it was trained, the DP guarantee in plain
words, how many members contributed, and what it was not tested on, so that
whoever receives the file can judge it without our source.
"""

from __future__ import annotations

from p2pfl.trained_model import TrainedModel


def _privacy(trained: TrainedModel) -> str:
    meta = trained.meta
    if meta.dp_mode is None or meta.epsilon is None:
        return ("Trained **without differential privacy**: nothing bounds what the weights "
                "reveal about the records they were trained on. Treat them as sensitive as "
                "the data.")
    unit = ("any one record" if meta.dp_mode == "sample"
            else "any one member's whole data set")
    return (f"Differential privacy (`--dp {meta.dp_mode}`): epsilon {meta.epsilon:.3g} at "
            f"delta {meta.delta:g}. In plain words: whether or not {unit} was used changes "
            f"the probability of any outcome of this node's training by a factor of at most "
            f"e^{meta.epsilon:.3g}, except with probability {meta.delta:g}. This covers this "
            f"node's releases; each member accounts for its own.")


def _inputs(trained: TrainedModel) -> str:
    inputs = trained.inputs
    if inputs is None:
        return ("The task's own tensors (a built-in or user task): preprocess as the task "
                "does before calling the model.")
    if inputs.kind == "csv":
        cats = [f"`{c}` (one of {', '.join(v)})" for c, v in inputs.categories.items()]
        return (f"CSV columns, in this order: {', '.join(f'`{c}`' for c in inputs.columns)}. "
                + (f"Categorical: {'; '.join(cats)}. " if cats else "")
                + "Each encoded feature is standardised with the training split's mean and "
                  "standard deviation (in the export's metadata; in the ONNX graph).")
    return (f"RGB images resized (bilinear) to {inputs.size}x{inputs.size}, pixels 0..255, "
            f"scaled to [0, 1] and normalised per channel with mean {inputs.mean} and std "
            f"{inputs.std}. The model uses BatchNorm over the batch in hand: classify whole "
            f"batches, not single images.")


def model_card(trained: TrainedModel, file_name: str, fmt: str) -> str:
    meta = trained.meta
    accuracy = "not measured" if meta.accuracy is None else f"{meta.accuracy:.4f}"
    members = len(meta.merged_from)
    contributed = (f"{members} other member(s) whose updates this node merged, and this node"
                   if members else "this node alone (no update of another member was merged)")
    return f"""# Model card: {file_name}

## What it is
A classifier for task `{meta.task}` (model `{meta.model or 'the task default'}`), with
{meta.num_classes} classes: {', '.join(f'`{c}`' for c in trained.classes)}.
Exported as {fmt} by p2pfl {meta.version}. Layout fingerprint `{meta.fingerprint}`.

Inputs: {_inputs(trained)}

## How it was trained
Decentralised federated learning (p2pfl): each member trains on its own data and
gossips signed model updates to a few neighbours; no data left any member. This copy
is one node's model after round {meta.round}: {meta.local_epochs} local epoch(s) of SGD
per round on its {meta.samples} training records, merged with neighbours by the
`{meta.aggregator}` rule.

Contributors: {contributed}.

## Privacy
{_privacy(trained)}

## Evaluation
Accuracy {accuracy} on this node's own held-out split (a stratified quarter of its file,
never trained on).

## What it was not tested on
It was not tested on any other member's data, on data from another site, time or
device than this node's, on classes outside the list above, or for calibration of its
probabilities, fairness across groups, or robustness to shifted or adversarial inputs.
Its held-out split is small and comes from the same file as its training data.
"""
