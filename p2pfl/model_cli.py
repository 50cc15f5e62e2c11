"""``p2pfl export``, ``p2pfl predict`` and ``p2pfl evaluate``: the trained model, used.

    p2pfl export --state-dir state --out model.safetensors [--format onnx|torch]
    p2pfl predict --state-dir state --task csv:new.csv [--out preds.csv]
    p2pfl evaluate --state-dir state --task csv:labelled.csv

``predict`` writes one row per input: its row (a CSV's line number, or an
image's path), the predicted class and each class's probability. The label
column may be there or not. ``evaluate`` needs it (or, for images, class
folders) and prints accuracy, per-class precision and recall and the confusion
matrix. Every error a user can cause is one line (the caller prints it) and
exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch, Pillow and the model are imported when a command runs, so that
    # `p2pfl status` and `p2pfl keygen` do not pay for importing torch.
    import torch

    from fltasks.inputs import InputSpec
    from p2pfl.trained_model import TrainedModel

COMMANDS = ("export", "predict", "evaluate")
FORMATS = ("safetensors", "onnx", "torch")


def add_commands(commands: Any) -> None:
    """Add ``export``, ``predict`` and ``evaluate`` to the ``p2pfl`` parser's subcommands."""
    exp = commands.add_parser("export", help="write the node's model (safetensors, onnx, torch) "
                                             "and its model card")
    exp.add_argument("--state-dir", required=True, metavar="DIR")
    exp.add_argument("--out", required=True, metavar="FILE")
    exp.add_argument("--format", choices=FORMATS, default="safetensors")
    for name, text in (("predict", "label new inputs with the node's model"),
                       ("evaluate", "accuracy, per-class precision/recall and the confusion "
                                    "matrix on a labelled file")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--state-dir", required=True, metavar="DIR")
        sub.add_argument("--task", required=True, metavar="csv:FILE|imagefolder:DIR")
        if name == "predict":
            sub.add_argument("--out", metavar="FILE", help="CSV to write (default: stdout)")


@dataclass
class Inputs:
    """What the Predictor takes, which row each is, and its class index where labelled."""

    x: torch.Tensor
    rows: list[str]
    labels: list[int] | None


def read_inputs(spec: InputSpec | None, task: str) -> Inputs:
    """``csv:FILE`` or ``imagefolder:DIR`` as the Predictor's input; TaskError lines."""
    import torch

    from fltasks import TaskError
    from fltasks.tabular import read_rows

    kind, _, path = task.partition(":")
    if spec is None:
        raise TaskError(f"--task {task}: this model was trained on a built-in or user task; "
                        f"predict and evaluate read csv:FILE or imagefolder:DIR models only")
    if kind != {"csv": "csv", "image": "imagefolder"}[spec.kind] or not path:
        want = "csv:FILE" if spec.kind == "csv" else "imagefolder:DIR"
        raise TaskError(f"--task {task!r}: this model takes {want}")
    if spec.kind == "csv":
        header, rows = read_rows(Path(path))
        x = spec.encode_rows(header, [row for _, row in rows], path)
        labels = None
        if spec.label in header:
            index, classes = header.index(spec.label), spec.classes
            for line, row in rows:
                if row[index].strip() not in classes:
                    raise TaskError(f"{path}: row {line}, label column {spec.label!r}: class "
                                    f"{row[index].strip()!r} is not one of {', '.join(classes)}")
            labels = [classes.index(row[index].strip()) for _, row in rows]
        return Inputs(torch.from_numpy(x), [str(line) for line, _ in rows], labels)
    return _read_images(Path(path), spec.size, spec.classes)


def _read_images(root: Path, size: int, classes: tuple[str, ...]) -> Inputs:
    import torch
    from PIL import Image, UnidentifiedImageError

    from fltasks import TaskError
    from fltasks.images import image_files

    if not root.is_dir():
        raise TaskError(f"{root}: no such folder of images")
    files = image_files(root)
    if not files:
        raise TaskError(f"{root}: no images")
    pixels, labels = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
            raise TaskError(f"{path}: cannot read the image ({error})") from None
        # Pixels 0..255 as the task reads them; /255 and normalisation are in the model.
        pixels.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1))
        folder = path.relative_to(root).parts[0] if path.parent != root else None
        labels.append(classes.index(folder) if folder in classes else -1)
    known = None if -1 in labels else labels
    rows = [str(path.relative_to(root)) for path in files]
    return Inputs(torch.from_numpy(np.stack(pixels)), rows, known)


def probabilities(trained: TrainedModel, x: torch.Tensor) -> np.ndarray:
    import torch

    with torch.no_grad():
        return trained.predictor()(x).numpy()


def run_export(args: argparse.Namespace) -> None:
    from p2pfl.export import export
    from p2pfl.trained_model import load_trained

    trained = load_trained(args.state_dir)
    card = export(trained, Path(args.out), args.format)
    print(f"wrote {args.out} ({args.format}) and its model card {card}")


def run_predict(args: argparse.Namespace) -> None:
    from p2pfl.trained_model import load_trained

    trained = load_trained(args.state_dir)
    inputs = read_inputs(trained.inputs, args.task)
    probs = probabilities(trained, inputs.x)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "predicted", *(f"p_{c}" for c in trained.classes)])
    for row, p in zip(inputs.rows, probs, strict=True):
        writer.writerow([row, trained.classes[int(p.argmax())], *(f"{v:.8g}" for v in p)])
    if args.out:
        Path(args.out).write_text(buffer.getvalue(), encoding="utf-8")
        print(f"wrote {len(inputs.rows)} predictions to {args.out}")
    else:
        sys.stdout.write(buffer.getvalue())


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def run_evaluate(args: argparse.Namespace) -> None:
    from fltasks import TaskError
    from p2pfl.trained_model import load_trained

    trained = load_trained(args.state_dir)
    inputs = read_inputs(trained.inputs, args.task)
    if inputs.labels is None:
        what = (f"label column {trained.inputs.label!r}" if trained.inputs
                and trained.inputs.kind == "csv" else "class folders for every image")
        raise TaskError(f"--task {args.task}: evaluate needs the {what}")
    labels = np.array(inputs.labels)
    predicted = probabilities(trained, inputs.x).argmax(axis=1)
    classes = trained.classes
    matrix = confusion(labels, predicted, len(classes))
    print(f"accuracy {float((predicted == labels).mean()):.4f} on {len(labels)} rows")
    width = max(len(c) for c in classes)
    print(f"{'class':<{width}}  precision  recall  support")
    for i, name in enumerate(classes):
        hits, said, real = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
        precision = f"{hits / said:.4f}" if said else "-"
        recall = f"{hits / real:.4f}" if real else "-"
        print(f"{name:<{width}}  {precision:>9}  {recall:>6}  {real:>7}")
    print("confusion matrix (rows: true class, columns: predicted)")
    print(f"{'':<{width}}  " + " ".join(f"{c:>{max(len(c), 5)}}" for c in classes))
    for i, name in enumerate(classes):
        print(f"{name:<{width}}  " + " ".join(f"{int(v):>{max(len(c), 5)}}"
                                               for c, v in zip(classes, matrix[i], strict=True)))


def run_with(fail: type[Exception]) -> Callable[[argparse.Namespace], None]:
    """The handler of these commands; ``fail`` is the CLI's one-line error type."""
    handlers = {"export": run_export, "predict": run_predict, "evaluate": run_evaluate}

    def run(args: argparse.Namespace) -> None:
        try:
            handlers[args.command](args)
        except (ValueError, OSError) as error:  # TaskError is a ValueError
            raise fail(str(error).splitlines()[0] if str(error) else repr(error)) from None

    return run
