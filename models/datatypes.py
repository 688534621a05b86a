"""The Open Inference Protocol datatypes and their numpy / torch counterparts.

BF16 has no numpy dtype: it travels as float32 in numpy and becomes torch.bfloat16 at the model.
BYTES tensors are numpy object arrays of `bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.float32),
    "BYTES": np.dtype(object),
}

DATATYPES = frozenset(NUMPY_DTYPES)

_FROM_NUMPY = {dt: name for name, dt in NUMPY_DTYPES.items() if name not in {"BF16", "BYTES"}}

FLOAT_DATATYPES = ("FP16", "FP32", "FP64", "BF16")


@cache  # called per batch by torch models
def torch_dtype(datatype: str) -> torch.dtype:
    """The torch dtype of a float datatype (a model's compute dtype). Imports torch: only torch models call it."""
    import torch

    return {"FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64, "BF16": torch.bfloat16}[datatype]


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name of a numpy array (object arrays are BYTES)."""
    if array.dtype == object:
        return "BYTES"
    try:
        return _FROM_NUMPY[array.dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype") from None


def random_inputs(specs: Iterable[Any], batch: int, seed: int = 0, free: int = 8) -> dict[str, np.ndarray]:
    """A batch of inputs fitting tensor specs (name, datatype, shape; -1 dimensions become `free`): floats
    uniform in [0, 1), integers zero, BYTES a short text. For warm-up runs, benchmarks and publishing's check."""
    rng = np.random.default_rng(seed)
    batch_inputs = {}
    for spec in specs:
        shape = [batch, *(free if d == -1 else d for d in spec.shape[1:])]
        if spec.datatype == "BYTES":
            batch_inputs[spec.name] = np.full(shape, b"warm up", dtype=object)
        elif spec.datatype in FLOAT_DATATYPES:
            batch_inputs[spec.name] = rng.random(shape).astype(NUMPY_DTYPES[spec.datatype])
        else:
            batch_inputs[spec.name] = np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype])
    return batch_inputs
