"""A node's trained model, rebuilt from its state dir with its preprocessing attached.

The checkpoint holds the weights as one vector and ``model.json`` says what they
are (p2pfl/model_meta.py). Here both become a torch module: the bare model the
task built, and :class:`Predictor`, which takes a task's raw inputs (a CSV's
encoded columns in raw units, or RGB pixels 0..255 as the task reads them) and
returns class probabilities. Nothing is unpickled: the checkpoint is msgpack
behind a BLAKE3 digest, and the weights are checked against the layout's
fingerprint before they are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fltasks import TaskError, load_task
from fltasks.inputs import InputSpec, Standardize
from fltasks.models import build_model, parse_model
from gossip.layout import ModelLayout
from p2pfl.checkpoint import CheckpointError, CheckpointStore
from p2pfl.model_meta import ModelMeta, ModelMetaError, read_meta
from p2pfl.training import load_arrays, model_arrays


class Predictor(nn.Module):
    """Preprocessing, the trained model and a softmax: raw inputs in, probabilities out.

    Like the task's own evaluation, a model with batch-statistics BatchNorm (cnn,
    resnet18) normalises over the batch it is given: give it whole batches.
    """

    def __init__(self, model: nn.Module, inputs: InputSpec | None) -> None:
        super().__init__()
        self.inputs = inputs
        scale = 255.0 if inputs is not None and inputs.kind == "image" else 1.0
        self.preprocess: nn.Module = nn.Identity() if inputs is None else Standardize(
            inputs, scale)
        self.model = model
        self.classes: tuple[str, ...] = () if inputs is None else inputs.classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(self.preprocess(x)), dim=1)

    def inputs_of(self, task: str) -> torch.Tensor:
        """``csv:FILE`` or ``imagefolder:DIR`` read as this module's input tensor."""
        from p2pfl.model_cli import read_inputs

        return read_inputs(self.inputs, task).x


@dataclass
class TrainedModel:
    meta: ModelMeta
    model: nn.Module  # the bare model, eval mode
    inputs: InputSpec | None

    @property
    def classes(self) -> tuple[str, ...]:
        if self.inputs is not None:
            return self.inputs.classes
        return tuple(str(i) for i in range(self.meta.num_classes))

    def predictor(self) -> Predictor:
        predictor = Predictor(self.model, self.inputs).eval()
        predictor.classes = self.classes
        return predictor


def _bare_model(meta: ModelMeta) -> nn.Module:
    if meta.inputs is not None and meta.model:
        return build_model(parse_model(meta.model), meta.input_shape, meta.num_classes, 0)
    # A built-in task is rebuilt from scikit-learn's files; a user's module:function
    # task must be importable here, as it was for the node.
    return load_task(meta.task, seed=meta.seed, model=meta.model or None).make_model()


def load_trained(state_dir: str | Path) -> TrainedModel:
    """The model in ``state_dir``; every problem is one ValueError line naming the fix."""
    try:
        meta = read_meta(state_dir)
        inputs = None if meta.inputs is None else InputSpec.from_json(meta.inputs)
        model = _bare_model(meta)
    except (ModelMetaError, TaskError) as error:
        raise ValueError(str(error)) from None
    spec_hash = bytes.fromhex(meta.task_spec_sha256 or "")
    layout = ModelLayout.of(model_arrays(model), spec_hash)
    if layout.fingerprint.hex() != meta.fingerprint:
        raise ValueError(f"{state_dir}: model.json's fingerprint does not match the model it "
                         f"names ({meta.model or meta.task}); the p2pfl version may differ")
    try:
        state = CheckpointStore(state_dir).load(layout.fingerprint, layout.size)
    except CheckpointError as error:
        raise ValueError(f"{state_dir}: {error}") from None
    if state is None:
        raise ValueError(f"{state_dir}: no checkpoint yet; run the node for a round first")
    arrays = {name: np.array(a, dtype=np.float32) if a.dtype == np.float64 else a
              for name, a in layout.unflatten(state.estimate).items()}
    load_arrays(model, arrays)
    model.eval()
    return TrainedModel(meta, model, inputs)
