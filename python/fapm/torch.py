"""PyTorch side of fapm: safetensors dtype names <-> torch dtypes, and tensors as flat bytes.

Tensors are made from the arrays fapm fills with ``torch.from_numpy`` (no copy), viewed with
the real dtype (``torch.bfloat16`` for BF16, which NumPy lacks).
"""

from __future__ import annotations

import numpy as np
import torch

# safetensors dtype name -> torch dtype.
DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
NAMES = {v: k for k, v in DTYPES.items()}

# The signed NumPy type of each width: torch.from_numpy takes these everywhere.
_SIGNED = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def to_tensor(raw: np.ndarray, dtype: str, shape) -> torch.Tensor:
    """Views ``raw`` (a flat array that fapm filled) as a tensor of ``dtype`` with ``shape``:
    no copy, the tensor shares the array's memory."""
    flat = torch.from_numpy(raw.view(_SIGNED[raw.dtype.itemsize]))
    return flat.view(DTYPES[dtype]).reshape(tuple(shape))


def dtype_name(t: torch.Tensor) -> str | None:
    """The safetensors name of ``t``'s dtype, or None when safetensors has none."""
    return NAMES.get(t.dtype)


def as_bytes(t: torch.Tensor, writable: bool) -> np.ndarray:
    """The bytes of ``t`` as a flat uint8 NumPy view of its memory (no copy); ``t`` must be a
    contiguous CPU tensor."""
    del writable  # torch tensors are always writable
    if t.device.type != "cpu":
        raise ValueError(f"on {t.device}: fapm reads and patches CPU tensors (patch, then move the model)")
    if not t.is_contiguous():
        raise ValueError("not contiguous")
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``."""
    return t.detach().clone()
