"""The Rust half of fapm (see ``fapm``). Tensors cross as flat NumPy arrays of bytes or of
unsigned integers of the element's width; ``fapm`` views them with their dtype and shape."""

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, final

import numpy as np
import numpy.typing as npt

_Path = Union[str, os.PathLike]
# progress(done, total, current): input bytes done, the total (0 while unknown), the tensor.
_Progress = Optional[Callable[[int, int, str], object]]

__all__ = ["FapmError", "Checkpoint", "Delta", "prune", "apply", "verify", "inspect", "card", "__version__", "_one_line"]

__version__: str

class FapmError(Exception):
    """A fapm failure: bad input, a hash mismatch, a corrupt delta. The message is the one
    the fapm command line prints after ``error:``."""

@final
class Checkpoint:
    """A base checkpoint (a .safetensors file, a directory of shards, or a Hugging Face repo id
    found in the cache or fetched), memory-mapped."""

    def __new__(cls, path: _Path, *, memory_budget: Optional[str] = None, charged: int = 0) -> "Checkpoint":
        """``charged``: the bytes of the budget's metadata half already taken by the delta this
        checkpoint is the base of (``Delta.metadata_bytes``): both stay within one budget."""
    @property
    def path(self) -> str: ...

@final
class Delta:
    """An opened delta: its verified manifest; blocks are read when a tensor is asked for. A part
    of a partitioned prune is refused, as ``fapm apply`` refuses it."""

    def __new__(
        cls,
        path: _Path,
        *,
        revision: Optional[str] = None,
        threads: Optional[int] = None,
        memory_budget: Optional[str] = None,
    ) -> "Delta": ...
    @property
    def path(self) -> str: ...
    @property
    def metadata_bytes(self) -> int:
        """The bytes of the memory budget the delta's records take (of the half metadata may use)."""
    def recorded_base(self) -> str:
        """The base checkpoint the delta records (repo id and commit), found in the Hugging Face
        cache or fetched."""
    def names(self) -> List[str]: ...
    def tensor(self, name: str) -> Tuple[str, List[int], str, Optional[str], int]:
        """``(dtype, shape, mode, base_dtype, kept)``; ``base_dtype`` is None when stored whole."""
    def base_shape(self, name: str) -> List[int]:
        """The base tensor's shape: the tensor's own, or the smaller one it grew from (added tokens)."""
    def info(self) -> Dict[str, Any]: ...
    def metadata(self) -> Optional[Dict[str, str]]: ...
    def reconstruct(
        self, name: str, base: Union[Checkpoint, npt.NDArray[np.uint8], None], base_label: str = "base"
    ) -> np.ndarray: ...
    def patch(
        self,
        name: str,
        target: npt.NDArray[np.uint8],
        check_base: bool = True,
        base_label: str = "base",
        done: Optional[List[str]] = None,
    ) -> None: ...
    def revert(self, name: str, target: npt.NDArray[np.uint8]) -> None: ...
    def check_base(self, name: str, base: npt.NDArray[np.uint8], base_label: str = "base") -> None: ...
    def patches(
        self, name: str, base: Union[Checkpoint, npt.NDArray[np.uint8]], base_label: str = "base"
    ) -> Tuple[npt.NDArray[np.int64], np.ndarray]: ...

def prune(
    base: _Path,
    finetuned: _Path,
    output: _Path,
    *,
    sparsity: str = "0.9",
    metric: str = "fapm",
    threshold: str = "exact",
    include: Sequence[str] = ...,
    exclude: Sequence[str] = ...,
    threads: Optional[int] = None,
    memory_budget: Optional[str] = None,
    overwrite: bool = False,
    penalty: str = "1",
    sparsity_for: Sequence[str] = ...,
    part: Optional[str] = None,
    progress: _Progress = None,
) -> Dict[str, Any]:
    """``fapm prune``; returns what ``--json`` prints (without ``peak_memory_bytes``).
    ``include``, ``exclude`` and ``sparsity_for`` are empty unless given. ``progress`` is
    called every 50 ms while it runs and once when it has finished; an exception it raises
    stops the run, as Ctrl-C does."""

def apply(
    base: Optional[_Path],
    delta: _Path,
    output: _Path,
    *,
    revision: Optional[str] = None,
    threads: Optional[int] = None,
    memory_budget: Optional[str] = None,
    overwrite: bool = False,
    progress: _Progress = None,
) -> Dict[str, Any]:
    """``fapm apply``; returns what ``--json`` prints (without ``peak_memory_bytes``).
    ``progress`` as for ``prune``."""

def verify(
    delta: _Path,
    base: Optional[_Path] = None,
    *,
    revision: Optional[str] = None,
    delta_only: bool = False,
    threads: Optional[int] = None,
    memory_budget: Optional[str] = None,
    progress: _Progress = None,
) -> Dict[str, Any]:
    """``fapm verify``; returns what ``--json`` prints (without ``peak_memory_bytes``).
    ``progress`` as for ``prune``."""

def inspect(delta: _Path, *, revision: Optional[str] = None, memory_budget: Optional[str] = None) -> Dict[str, Any]:
    """``fapm inspect --json``, as a dict."""

def card(
    delta: _Path,
    output: _Path,
    *,
    revision: Optional[str] = None,
    report: Optional[_Path] = None,
    finetuned_card: Optional[_Path] = None,
    repo_id: Optional[str] = None,
    memory_budget: Optional[str] = None,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """``fapm card``: the delta and a README.md model card in ``output``, ready for
    ``hf upload``; returns what ``--json`` prints."""

def _one_line(msg: str) -> str:
    """``msg`` as one printable line: line breaks as spaces, control characters escaped, as
    fapm's own messages are."""
