"""``p2pfl export``: the trained model as safetensors, ONNX or a torch state_dict, and its card.

* safetensors (default): the bare model's tensors (no pickle) and, as metadata
  strings, the task and model specs, the layout fingerprint, the round, the
  held-out accuracy, epsilon and delta under DP, the number of members merged,
  the preprocessing (JSON) and the project's version.
* onnx: a graph from the task's raw inputs to class probabilities. A CSV task
  takes one input per feature column, named by the column, in file order
  ([n, 1] float for a number, [n, 1] string for a category); the one-hot
  encoding (ONNX ``Equal`` on strings) and the standardisation are in the graph.
  An image task takes RGB pixels 0..255 as [n, 3, S, S] after the resize the
  task does; the /255 and the channel normalisation are in the graph.
* torch: ``torch.save`` of the bare model's ``state_dict``, tensors only; load
  it with ``torch.load(path, weights_only=True)``.

Beside every export, ``FILE.md`` is the model card (p2pfl/model_card.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from p2pfl.model_card import model_card
from p2pfl.model_cli import FORMATS
from p2pfl.trained_model import Predictor, TrainedModel

ONNX_OPSET = 19  # Equal on strings needs opset 19


def metadata(trained: TrainedModel) -> dict[str, str]:
    """The export's metadata, as the string map safetensors stores."""
    meta = trained.meta
    fields: dict[str, object] = {
        "format": "p2pfl-export-v1", "task": meta.task, "model": meta.model,
        "label": meta.label, "fingerprint": meta.fingerprint, "round": meta.round,
        "accuracy": meta.accuracy, "dp_mode": meta.dp_mode, "epsilon": meta.epsilon,
        "delta": meta.delta, "members_merged": len(meta.merged_from),
        "classes": list(trained.classes), "input_shape": meta.input_shape,
        "inputs": meta.inputs, "task_spec_sha256": meta.task_spec_sha256,
        "p2pfl_version": meta.version,
    }
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in fields.items() if value is not None}


def export(trained: TrainedModel, out: Path, fmt: str = "safetensors") -> Path:
    """Write ``out`` in ``fmt`` and the card beside it; returns the card's path."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone()
               for name, t in trained.model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out), metadata=metadata(trained))
    elif fmt == "torch":
        torch.save(tensors, out)
    else:
        out.write_bytes(onnx_bytes(trained))
    card = out.with_name(out.name + ".md")
    card.write_text(model_card(trained, out.name, fmt), encoding="utf-8")
    return card


def onnx_bytes(trained: TrainedModel) -> bytes:
    """The ONNX graph: raw inputs in, probabilities out (module docstring)."""
    try:
        import onnx
        from onnx import TensorProto, compose, helper
    except ImportError:
        raise ValueError("--format onnx needs the onnx package: pip install "
                         "'p2pfl-gossip[onnx]'") from None
    inputs = trained.inputs
    from fltasks.task import normalises_over_batch

    if normalises_over_batch(trained.model):
        # Batch-statistics BatchNorm (cnn, resnet18) has no fixed graph for a batch of
        # any size: the exporter refuses it. Known gap of issue 23 (see the report).
        raise ValueError(f"--format onnx: model {trained.meta.model} normalises over its "
                         f"batch (BatchNorm without running statistics), which ONNX export "
                         f"cannot express; use --format safetensors or torch")
    predictor = trained.predictor()
    shape = (2, *trained.meta.input_shape)
    body = _torch_onnx(predictor, torch.zeros(shape), "features" if inputs is None
                       or inputs.kind == "csv" else "image")
    model = onnx.load_from_string(body)
    if inputs is None or inputs.kind != "csv":
        return model.SerializeToString()
    # The front: one input per CSV column, one-hot for categories, concatenated in the
    # order the task encodes (fltasks/inputs.py), feeding the body's "features".
    graph_inputs, nodes, parts, constants = [], [], [], []
    for i, name in enumerate(inputs.columns):
        if name in inputs.categories:
            values = list(inputs.categories[name])
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING,
                                                              ["n", 1]))
            constants.append(helper.make_tensor(f"categories_{i}", TensorProto.STRING,
                                                [1, len(values)], [v.encode() for v in values]))
            nodes.append(helper.make_node("Equal", [name, f"categories_{i}"], [f"hot_{i}"]))
            nodes.append(helper.make_node("Cast", [f"hot_{i}"], [f"onehot_{i}"],
                                          to=TensorProto.FLOAT))
            parts.append(f"onehot_{i}")
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                              ["n", 1]))
            parts.append(name)
    nodes.append(helper.make_node("Concat", parts, ["encoded"], axis=1))
    front = helper.make_graph(nodes, "p2pfl_csv_front", graph_inputs,
                              [helper.make_tensor_value_info("encoded", TensorProto.FLOAT,
                                                             ["n", inputs.features])],
                              initializer=constants)
    front_model = helper.make_model(front, opset_imports=model.opset_import,
                                    ir_version=model.ir_version)
    merged = compose.merge_models(front_model, model, io_map=[("encoded", "features")])
    onnx.checker.check_model(merged)
    return merged.SerializeToString()


def _torch_onnx(predictor: Predictor, example: torch.Tensor, input_name: str) -> bytes:
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which
        # needs onnxscript; this one needs nothing more and torch is pinned (2.13).
        warnings.simplefilter("ignore")
        torch.onnx.export(predictor, (example,), buffer, dynamo=False,
                          input_names=[input_name], output_names=["probabilities"],
                          dynamic_axes={input_name: {0: "n"}, "probabilities": {0: "n"}},
                          opset_version=ONNX_OPSET)
    return buffer.getvalue()
