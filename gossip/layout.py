"""A model's parameter layout: names, dtypes and shapes, its fingerprint, and flattening.

The fingerprint tells peers apart that train different models: two nodes can
only average parameters that line up name by name and shape by shape. The
gossip rules work on one flat vector per node; the layout maps that vector to
named tensors and back without copying where it can.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

FINGERPRINT_BYTES = 32
_FINGERPRINT_DOMAIN = b"p2pfl/model-fingerprint/v1\n"

# Little-endian numpy dtypes a peer may send; anything else is malformed.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
        "int8": "i1",
        "uint8": "u1",
        "int16": "<i2",
        "int32": "<i4",
        "int64": "<i8",
    }.items()
}


@dataclass(frozen=True)
class TensorSpec:
    """One named parameter: what must match between peers."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def model_fingerprint(specs: Iterable[TensorSpec], task_spec_hash: bytes = b"") -> bytes:
    """SHA-256 over the names, dtypes and shapes, in order (see docs/PROTOCOL.md).

    ``task_spec_hash`` is the hook for the task spec file the members share
    (fltasks/spec.py): given, it adds one last line, so that members whose
    specs differ (another class order, say) refuse each other as wrong-model
    even when their tensors line up. Empty, the fingerprint is as before. The
    line has two tab-separated fields where a tensor's has three, so no tensor
    can produce it.
    """
    digest = hashlib.sha256(_FINGERPRINT_DOMAIN)
    for spec in specs:
        digest.update(f"{spec.name}\t{spec.dtype}\t{','.join(map(str, spec.shape))}\n".encode())
    if task_spec_hash:
        digest.update(b"task-spec\t" + task_spec_hash.hex().encode() + b"\n")
    return digest.digest()


@dataclass(frozen=True)
class ModelLayout:
    """The ordered parameter specs of a model and the flat-vector view of them."""

    specs: tuple[TensorSpec, ...]
    # The shared task spec's SHA-256, or b"" (see model_fingerprint).
    task_spec_hash: bytes = b""

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray], task_spec_hash: bytes = b"") -> ModelLayout:
        specs = []
        for name, array in tensors.items():
            dtype_name = array.dtype.name
            if dtype_name not in ALLOWED_DTYPES:
                raise ValueError(f"parameter {name!r} has dtype {dtype_name}, not gossip-able")
            specs.append(TensorSpec(name, dtype_name, tuple(int(d) for d in array.shape)))
        return cls(tuple(specs), task_spec_hash)

    @property
    def fingerprint(self) -> bytes:
        return model_fingerprint(self.specs, self.task_spec_hash)

    @property
    def size(self) -> int:
        return sum(spec.size for spec in self.specs)

    def flatten(
        self, tensors: Mapping[str, np.ndarray], dtype: np.dtype | str = "float64"
    ) -> np.ndarray:
        """One contiguous vector holding every parameter, in layout order."""
        vector = np.empty(self.size, dtype=dtype)
        offset = 0
        for spec in self.specs:
            vector[offset : offset + spec.size] = np.asarray(tensors[spec.name]).reshape(-1)
            offset += spec.size
        return vector

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Named views into ``vector`` (no copy), each cast to its spec's dtype only if needed."""
        if vector.shape != (self.size,):
            raise ValueError(f"expected a vector of {self.size} values, got shape {vector.shape}")
        tensors = {}
        offset = 0
        for spec in self.specs:
            view = vector[offset : offset + spec.size].reshape(spec.shape)
            tensors[spec.name] = view.astype(ALLOWED_DTYPES[spec.dtype], copy=False)
            offset += spec.size
        return tensors
