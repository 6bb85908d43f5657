"""NumPy side of fapm: safetensors dtype names <-> NumPy dtypes, and arrays as flat bytes.

bf16 and the 8-bit floats come from ``ml_dtypes`` (the NumPy bf16 that JAX uses).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# safetensors dtype name -> NumPy dtype.
DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
}
NAMES = {v: k for k, v in DTYPES.items()}


def to_array(raw: np.ndarray, dtype: str, shape) -> np.ndarray:
    """Views ``raw`` (a flat array that fapm filled) as ``dtype`` with ``shape``: no copy."""
    return raw.view(DTYPES[dtype]).reshape(tuple(shape))


def dtype_name(a: np.ndarray) -> str | None:
    """The safetensors name of ``a``'s dtype, or None when safetensors has none."""
    return NAMES.get(a.dtype)


def as_bytes(a: np.ndarray, writable: bool) -> np.ndarray:
    """The bytes of ``a`` as a flat uint8 view (no copy); ``a`` must be C-contiguous."""
    if not a.flags.c_contiguous:
        raise ValueError("not C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError("read-only")
    return a.reshape(-1).view(np.uint8)


def copy(a: np.ndarray) -> np.ndarray:
    """A copy of ``a``."""
    return a.copy()
