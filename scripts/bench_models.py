"""Per-step training time and bytes per update for each model choice, on one CPU thread.

For each ``--model`` choice (``mlp:256,128``, ``cnn``, ``resnet18``) on
3x32x32 inputs with 10 classes, and the built-in digits MLP (4,810
parameters) as the reference measured in the same run, this reports:

* ``params``: trainable parameters (= the tensors a node gossips: BatchNorm
  keeps no buffers, see fltasks/models.py);
* ``step_ms``: one SGD step of ``Task.train`` on a batch of 32 (forward,
  backward, update), median of ``--steps`` steps after one warm-up step;
* ``step_ratio``: ``step_ms`` over the digits MLP's, measured in the same run;
* ``bytes_raw`` / ``bytes_fp16`` / ``bytes_int8``: the signed update message
  ``GossipNode.prepare`` builds for one neighbour, per codec;
* ``prepare_ms`` / ``admit_ms``: building and signing that raw message, and
  admitting it at a receiver (parse, verify, decode, checks), median of 3.

Inputs are random tensors: the cost of a step does not depend on the pixel
values. Threads are pinned to 1, as the daemon pins them (cli.run_node). Prints
a table, then one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from fltasks import Task, load_task
from fltasks.models import build_model, parse_model
from gossip import AdmissionPolicy, GossipNode, NodeKey
from gossip.admission import Admission

MODELS = ("mlp:256,128", "cnn", "resnet18")
IMAGE_SHAPE = (3, 32, 32)
BATCH = 32


def image_task(model: str, samples: int) -> Task:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *IMAGE_SHAPE, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    spec = parse_model(model)
    return Task(
        name=model, make_model=lambda: build_model(spec, IMAGE_SHAPE, 10, seed=0),
        x_train=x, y_train=y, x_test=x[:BATCH], y_test=y[:BATCH],
        num_classes=10, lr=0.01, batch_size=BATCH,
    )


def median_ms(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def step_ms(task: Task, steps: int) -> float:
    """Median time of one SGD step: ``Task.train`` over exactly one batch."""
    model = task.make_model()
    x, y = task.x_train[:BATCH], task.y_train[:BATCH]
    generator = torch.Generator().manual_seed(0)
    task.train(model, x, y, 1, generator)  # warm-up: allocator, kernels
    return median_ms(lambda: task.train(model, x, y, 1, generator), steps)


def update_costs(task: Task) -> dict[str, float]:
    tensors = {k: v.detach().numpy() for k, v in task.make_model().state_dict().items()}
    result: dict[str, float] = {}
    for codec in ("raw", "fp16", "int8"):
        node = GossipNode.create(NodeKey.generate(), tensors, samples=100, codec_id=codec)
        result[f"bytes_{codec}"] = len(node.prepare(1, time.time()).message)
    sender = GossipNode.create(NodeKey.generate(), tensors, samples=100)
    message = sender.prepare(1, time.time()).message
    result["prepare_ms"] = median_ms(lambda: sender.prepare(1, time.time()), 3)
    policy = AdmissionPolicy(fingerprint=sender.layout.fingerprint,
                             max_message_bytes=len(message) + 1)

    def admit() -> None:
        verdict = Admission(policy).admit(message, time.time())
        assert verdict.accepted, verdict

    result["admit_ms"] = median_ms(admit, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed SGD steps per model")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    reference = load_task("digits")
    rows = [("digits mlp (reference)", reference)]
    rows += [(name, image_task(name, BATCH)) for name in args.models]
    reference_ms = step_ms(reference, args.steps)
    results = []
    for name, task in rows:
        ms = reference_ms if task is reference else step_ms(task, args.steps)
        row = {"model": name, "params": task.num_parameters(), "step_ms": round(ms, 2),
               "step_ratio": round(ms / reference_ms, 1)}
        row.update({k: round(v, 2) if isinstance(v, float) else v
                    for k, v in update_costs(task).items()})
        results.append(row)

    table = Table(title=f"one SGD step (batch {BATCH}, 1 thread) and one update, per model")
    for column in results[0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in results:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
    Console(width=160).print(table)
    for row in results:
        print(json.dumps({"kind": "model", **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
