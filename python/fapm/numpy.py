"""NumPy side of fapm: safetensors dtype names <-> NumPy dtypes, and arrays as flat bytes.

bf16 and the 8-bit floats come from ``ml_dtypes`` (the NumPy bf16 that JAX uses), imported the
first time such a tensor is made: importing it costs more than the rest of ``import fapm``.
``DTYPES`` and ``NAMES`` (the full tables) import it when read.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

# safetensors dtype name -> NumPy dtype, for the dtypes NumPy has itself.
_PLAIN = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
}
_PLAIN_NAMES = {v: k for k, v in _PLAIN.items()}
# safetensors dtype name -> the ml_dtypes type, for the dtypes NumPy lacks.
_EXTRA = {"F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "BF16": "bfloat16"}
# The order of safetensors' dtype list, for the full table.
_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


@functools.lru_cache(maxsize=None)
def _all() -> dict:
    import ml_dtypes

    extra = {k: np.dtype(getattr(ml_dtypes, v)) for k, v in _EXTRA.items()}
    return {k: _PLAIN.get(k) or extra[k] for k in _ORDER}


@functools.lru_cache(maxsize=None)
def _names() -> dict:
    return {v: k for k, v in _all().items()}


def __getattr__(name: str):
    # The full tables, made (and ml_dtypes imported) when first read.
    if name == "DTYPES":
        return _all()
    if name == "NAMES":
        return _names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dtype(name: str) -> np.dtype:
    """The NumPy dtype of safetensors dtype ``name`` (importing ``ml_dtypes`` for bf16 and the
    8-bit floats)."""
    d = _PLAIN.get(name)
    return d if d is not None else _all()[name]


def to_array(raw: np.ndarray, dtype: str, shape) -> np.ndarray:
    """Views ``raw`` (a flat array that fapm filled) as ``dtype`` with ``shape``: no copy."""
    return raw.view(_dtype(dtype)).reshape(tuple(shape))


def dtype_name(a: np.ndarray) -> str | None:
    """The safetensors name of ``a``'s dtype, or None when safetensors has none."""
    name = _PLAIN_NAMES.get(a.dtype)
    # An array of an ml_dtypes type exists only once ml_dtypes was imported.
    if name is None and "ml_dtypes" in sys.modules:
        name = _names().get(a.dtype)
    return name


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


def itemsize(dtype: str) -> int:
    """The bytes of one element of safetensors dtype ``dtype`` (without importing ml_dtypes)."""
    d = _PLAIN.get(dtype)
    return d.itemsize if d is not None else (2 if dtype == "BF16" else 1)
