"""``model.json``: what a node's checkpoint holds, in words a tool can read.

The checkpoint (p2pfl/checkpoint.py) is a flat float64 vector; nothing in it
says which model or which preprocessing it belongs to. Beside it, after every
checkpoint, the node writes this small JSON file (atomically): the task and
model specs, the layout fingerprint, the tensor layout, the round, held-out
accuracy and loss, the privacy spent, the members whose updates were merged,
and the input preprocessing (fltasks/inputs.py). ``p2pfl export``, ``predict``,
``evaluate`` and ``p2pfl.load_model`` read it; the daemon never trusts it for
anything but the count of merged members on a restart.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fltasks.models import parse_model
from p2pfl.config import NodeConfig
from p2pfl.member_store import write_atomically

logger = logging.getLogger(__name__)

META_FILE = "model.json"
FORMAT = "p2pfl-model-v1"


class ModelMetaError(ValueError):
    """A state dir without a readable model.json; the message is one line."""


def project_version() -> str:
    try:
        return importlib.metadata.version("p2pfl-gossip")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class ModelMeta:
    task: str
    model: str
    seed: int
    fingerprint: str  # hex of the layout fingerprint (gossip/layout.py)
    layout: list[tuple[str, str, list[int]]]  # (name, dtype, shape) in flattening order
    num_classes: int
    input_shape: list[int]
    round: int
    accuracy: float | None
    loss: float | None
    samples: int
    local_epochs: int
    aggregator: str
    label: str | None = None
    task_spec_sha256: str | None = None
    inputs: dict[str, Any] | None = None  # fltasks.inputs.InputSpec.to_json()
    dp_mode: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    # Peer ids (hex keys) of the distinct members whose updates a merge folded in.
    merged_from: list[str] = field(default_factory=list)
    version: str = field(default_factory=project_version)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


def resolved_model(config: NodeConfig) -> str:
    """The model a data-file task was built with ("" for a built-in or user task)."""
    from fltasks.images import DEFAULT_IMAGE_MODEL
    from fltasks.spec import load_spec
    from fltasks.tabular import DEFAULT_TABULAR_MODEL

    if config.task_spec:
        return str(load_spec(config.task_spec).model)
    if config.model:
        return str(parse_model(config.model))
    kind = config.task.partition(":")[0]
    return {"csv": DEFAULT_TABULAR_MODEL, "imagefolder": DEFAULT_IMAGE_MODEL}.get(kind, "")


def write_meta(state_dir: str | Path, meta: ModelMeta) -> None:
    """Atomic, like the checkpoint: a reader never sees half a file."""
    text = json.dumps(meta.to_json(), indent=1, sort_keys=True)
    write_atomically(Path(state_dir) / META_FILE, text.encode(), mode=0o600)


def read_meta(state_dir: str | Path) -> ModelMeta:
    path = Path(state_dir) / META_FILE
    if not Path(state_dir).is_dir():
        raise ModelMetaError(f"--state-dir {state_dir}: no such folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelMetaError(f"{path}: missing; run the node with this --state-dir for at "
                             f"least one round first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelMetaError(f"{path}: unreadable ({error})") from None
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
        raise ModelMetaError(f"{path}: not a {FORMAT} file")
    try:
        meta = ModelMeta(**raw)
    except TypeError as error:
        raise ModelMetaError(f"{path}: malformed ({error})") from None
    meta.layout = [(str(n), str(d), [int(x) for x in s]) for n, d, s in meta.layout]
    return meta


def node_meta(
    config: NodeConfig, training: Any, gossip: Any, budget: Any, rounds: Any, round_number: int
) -> ModelMeta:
    """What model.json says of the checkpoint a node just wrote at ``round_number``."""
    task, layout = training.task, gossip.layout
    return ModelMeta(
        task=config.task, model=resolved_model(config), seed=config.seed,
        fingerprint=layout.fingerprint.hex(),
        layout=[(spec.name, spec.dtype, list(spec.shape)) for spec in layout.specs],
        num_classes=task.num_classes, input_shape=list(task.input_shape),
        round=round_number, accuracy=rounds.accuracy, loss=rounds.loss,
        samples=training.samples, local_epochs=config.local_epochs,
        aggregator=config.aggregator, label=config.label,
        task_spec_sha256=task.spec_hash.hex() or None,
        inputs=None if task.inputs is None else task.inputs.to_json(),
        dp_mode=config.dp_mode, epsilon=budget.epsilon,
        delta=config.dp_delta if config.dp_enabled else None,
        merged_from=sorted(sender.hex() for sender in gossip.merged_from),
    )


def write_meta_logged(state_dir: str | Path, meta: ModelMeta) -> None:
    """:func:`write_meta`; an I/O error is logged, and the next checkpoint retries (like
    the checkpoint's own: a full disk never stops a node)."""
    try:
        write_meta(state_dir, meta)
    except OSError as error:
        logger.warning("model.json not written (%s)", error.strerror or error)


def restore_merged_from(state_dir: str | Path, gossip: Any) -> None:
    """On a restart, the count of members whose updates were merged: the one thing the
    daemon takes from model.json, and only for the model it describes."""
    try:
        meta = read_meta(state_dir)
    except (ModelMetaError, ValueError):
        return  # an older state dir, or a torn one: the count restarts from zero
    if meta.fingerprint != gossip.layout.fingerprint.hex():
        return
    try:
        merged = {bytes.fromhex(h) for h in meta.merged_from}
    except (TypeError, ValueError):
        return  # not hex: the count restarts from zero
    gossip.merged_from.update(merged)
