"""fapm: use fapm deltas from Python, without writing a model to disk.

A fapm delta holds what rebuilds a pruned fine-tune from its base. This package reads it with the
same Rust code as the ``fapm`` command line, checking the same hashes:

- ``load_file(delta, base)`` / ``safe_open(delta, base)``: the fine-tuned tensors, rebuilt in
  memory from the base checkpoint (a ``.safetensors`` file or a directory), as NumPy arrays or
  torch tensors;
- ``patch_(model, delta)`` / ``with patched(model, delta):``: a model (``torch.nn.Module``) or
  dict of arrays that holds the base becomes the fine-tune in place (and, for ``patched``, the
  base again on exit);
- ``iter_patches(delta, base)``: ``(name, indices, values)`` per tensor, for engines that take
  sparse updates;
- ``prune``, ``apply``, ``verify``, ``inspect``: the command line's commands, returning what
  their ``--json`` prints, as dicts.

Every failure raises ``FapmError`` with the message the command line prints (one line, control
characters from file and tensor names escaped); Ctrl-C interrupts a long call
(``KeyboardInterrupt``), leaving targets as they were.

Every entry point that reads a delta or a checkpoint takes ``memory_budget=`` (the command
line's ``--memory-budget``: ``"256M"``, ``"4G"``, ...; default 256 MiB) and, where the work runs
on a thread pool, ``threads=`` (default: every core). The budget bounds fapm's own memory: the
manifest, the blocks in flight and their buffers, whatever the thread count; a delta and the
base opened with it share one budget, as in ``fapm apply``. The arrays a call
returns are not counted, except bytes that no base bounds (a tensor stored whole, the added rows
of a resized vocabulary): those are allocated only up to the budget, or 64 times their
compressed size in the delta if that is more, so that a small hostile delta cannot ask for
gigabytes. Settings are checked by the command line's own code, with its messages. Numbers
(``sparsity=0.9``, ``penalty=0.5``, ``memory_budget=2**30``) may be given as Python ints and
floats, a float taken as the decimal its ``repr`` shows (``0.9`` is exactly 0.9, as
``--sparsity 0.9`` is), or as the command line's text (``"0.9"``, ``"512M"``).

Long calls (``prune``, ``apply``, ``verify``, ``load_file``, ``patch_``, ``patched``,
``iter_patches``) show a progress bar, as ``huggingface_hub`` shows its downloads, when tqdm is
installed and the call takes more than a second: ``progress=False``, or ``FAPM_NO_PROGRESS=1`` or
``HF_HUB_DISABLE_PROGRESS_BARS=1`` in the environment, turns it off; ``progress=True`` shows it
at once.

``import fapm`` imports neither torch nor ``ml_dtypes``: each is imported when first needed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from . import _fapm
from . import _names
from . import _options
from . import numpy as _np
from ._fapm import Checkpoint as _Checkpoint
from ._fapm import Delta as _Delta
from ._fapm import FapmError, __version__, card
from ._fapm import _one_line
from ._progress import Bar as _Bar
from .sweep import sweep

__all__ = [
    "FapmError",
    "apply",
    "card",
    "inspect",
    "iter_patches",
    "load_file",
    "patch_",
    "patched",
    "prune",
    "safe_open",
    "sweep",
    "verify",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]
Rename = Union[Mapping[str, Optional[str]], Callable[[str], Optional[str]], None]


def _framework(name: str):
    if name in ("np", "numpy"):
        return _np
    if name in ("pt", "torch"):
        from . import torch as _pt

        return _pt
    raise ValueError(f"framework must be 'np' or 'pt', not {name!r}")


def _delta(
    delta,
    threads: Optional[int] = None,
    memory_budget: Union[str, int, None] = None,
    call: str = "",
    base=None,
) -> _Delta:
    """Opens ``delta``; when it is not a delta but a checkpoint, says so (and that the
    arguments are swapped, when ``base``, given to ``call`` as the base, is the delta)."""
    if isinstance(delta, _Delta):
        return delta
    budget = _options.size("memory_budget", memory_budget)
    try:
        return _Delta(delta, threads=threads, memory_budget=budget)
    except FapmError as e:
        raise _not_a_delta(delta, call, base, budget) or e from None


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _not_a_delta(path, call: str, base, budget) -> Optional[FapmError]:
    """The error for ``path``, given as a delta, when it is a checkpoint (opened by the Rust
    side, which checks every header): None when it is not one either."""
    if not _is_path(path) or not os.path.exists(path):
        return None  # a repo id that did not open as a delta is not looked up as a model
    try:
        _Checkpoint(path, memory_budget=budget)
    except FapmError:
        return None
    what = f"{os.fspath(path)}: is a safetensors checkpoint (a model), not a fapm delta"
    swapped = False
    if _is_path(base):
        try:
            _Delta(base, memory_budget=budget)
            swapped = True
        except FapmError:
            pass
    if swapped:
        return _error(
            f"{what}, and {os.fspath(base)} is the delta: the arguments are swapped ({call}(delta, base, ...))"
        )
    return _error(f"{what} (a delta is what fapm.prune or `fapm prune` writes)")


def _checkpoint(path, memory_budget: Union[str, int, None], beside: Optional[_Delta] = None) -> _Checkpoint:
    """Opens the checkpoint ``path``; as the base of ``beside``, within what that delta's records
    leave of the budget's metadata half (one budget for both, as in ``fapm apply``)."""
    charged = beside.metadata_bytes if beside is not None else 0
    return _Checkpoint(path, memory_budget=_options.size("memory_budget", memory_budget), charged=charged)


def _error(msg: str) -> FapmError:
    """``FapmError`` with ``msg`` made one printable line, as fapm's own messages are (names in
    it come from the delta)."""
    return FapmError(_one_line(msg))


def prune(
    base: PathLike,
    finetuned: PathLike,
    output: PathLike,
    *,
    sparsity: _options.Number = "0.9",
    metric: str = "fapm",
    threshold: str = "exact",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    threads: Optional[int] = None,
    memory_budget: Union[str, int, None] = None,
    overwrite: bool = False,
    penalty: _options.Number = "1",
    sparsity_for: Union[Sequence[Union[str, Tuple[str, _options.Number]]], Mapping[str, _options.Number]] = (),
    part: Optional[str] = None,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """``fapm prune``: writes the delta of ``finetuned`` against ``base`` to ``output`` and
    returns what ``--json`` prints (without ``peak_memory_bytes``), as a dict. The options are
    the command line's flags: ``sparsity`` and ``penalty`` are numbers (``0.9``) or their
    text (``"0.9"``); ``sparsity_for`` is a list of ``"REGEX=S"`` rules, of ``(regex, S)``
    pairs, or a dict ``{regex: S}`` (in order: the first matching rule wins). ``progress`` as
    the package's documentation says."""
    with _Bar("fapm prune", 0, progress) as bar:
        return _fapm.prune(
            base,
            finetuned,
            output,
            sparsity=_options.decimal("sparsity", sparsity),
            metric=metric,
            threshold=threshold,
            include=list(include),
            exclude=list(exclude),
            threads=threads,
            memory_budget=_options.size("memory_budget", memory_budget),
            overwrite=overwrite,
            penalty=_options.decimal("penalty", penalty),
            sparsity_for=_options.sparsity_rules(sparsity_for),
            part=part,
            progress=bar.callback(),
        )


def apply(
    base: Optional[PathLike],
    delta: PathLike,
    output: PathLike,
    *,
    revision: Optional[str] = None,
    threads: Optional[int] = None,
    memory_budget: Union[str, int, None] = None,
    overwrite: bool = False,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """``fapm apply``: writes the fine-tuned model rebuilt from ``base`` and ``delta`` to
    ``output`` and returns what ``--json`` prints (without ``peak_memory_bytes``), as a dict.
    Either may be a Hub repo id (``revision`` is the delta's); ``base=None`` uses the base the
    delta records."""
    budget = _options.size("memory_budget", memory_budget)
    with _Bar("fapm apply", 0, progress) as bar:
        try:
            return _fapm.apply(
                base, delta, output, revision=revision, threads=threads, memory_budget=budget,
                overwrite=overwrite, progress=bar.callback(),
            )
        except FapmError as e:
            raise _not_a_delta(delta, "apply", base, budget) or e from None


def verify(
    delta: PathLike,
    base: Optional[PathLike] = None,
    *,
    revision: Optional[str] = None,
    delta_only: bool = False,
    threads: Optional[int] = None,
    memory_budget: Union[str, int, None] = None,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """``fapm verify``: every hash inside ``delta``; with ``base`` (or the base the delta
    records, unless ``delta_only``), also the base and the whole reconstruction, writing
    nothing. Returns what ``--json`` prints (without ``peak_memory_bytes``), as a dict."""
    budget = _options.size("memory_budget", memory_budget)
    with _Bar("fapm verify", 0, progress) as bar:
        try:
            return _fapm.verify(
                delta, base, revision=revision, delta_only=delta_only, threads=threads, memory_budget=budget,
                progress=bar.callback(),
            )
        except FapmError as e:
            raise _not_a_delta(delta, "verify", base, budget) or e from None


def inspect(
    delta: PathLike, *, revision: Optional[str] = None, memory_budget: Union[str, int, None] = None
) -> Dict[str, Any]:
    """``fapm inspect --json``: the delta's header and every tensor's record, as a dict."""
    budget = _options.size("memory_budget", memory_budget)
    try:
        return _fapm.inspect(delta, revision=revision, memory_budget=budget)
    except FapmError as e:
        raise _not_a_delta(delta, "inspect", None, budget) or e from None


class safe_open:
    """A delta and its base, opened for reading tensors one at a time, like
    ``safetensors.safe_open``::

        with fapm.safe_open("ft.fapm", "base/", framework="pt") as f:
            for name in f.keys():
                w = f.get_tensor(name)

    ``delta`` is a fapm delta file, ``base`` the base checkpoint it was made against (a
    ``.safetensors`` file or a directory of shards), ``framework`` ``"np"`` (NumPy arrays;
    BF16 as ``ml_dtypes.bfloat16``) or ``"pt"`` (torch tensors). The base is memory-mapped;
    nothing is read until a tensor is asked for. ``threads`` (default: every core) decode each
    tensor's blocks; ``memory_budget`` bounds the memory fapm uses for it (see the package's
    documentation). A part of a partitioned prune is refused, as ``fapm apply`` refuses it.
    """

    def __init__(
        self,
        delta: PathLike,
        base: Optional[PathLike] = None,
        framework: str = "np",
        *,
        threads: Optional[int] = None,
        memory_budget: Union[str, int, None] = None,
    ):
        self._fw = _framework(framework)
        self._delta = _delta(delta, threads, memory_budget, "safe_open", base)
        if base is None:
            base = self._delta.recorded_base()
        self._base = _checkpoint(base, memory_budget, self._delta)

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def keys(self) -> List[str]:
        """The tensor names of the fine-tuned model, in its order."""
        return self._delta.names()

    def get_tensor(self, name: str):
        """Tensor ``name`` of the fine-tuned model, rebuilt from the base and the delta. The
        base tensor's hash, every block's hash and the result's hash are checked before it is
        returned (``FapmError`` otherwise)."""
        dtype, shape, _, _, _ = self._delta.tensor(name)
        raw = self._delta.reconstruct(name, self._base)
        return _to(self._fw, raw, dtype, shape)

    def metadata(self) -> Optional[Dict[str, str]]:
        """The ``__metadata__`` of the fine-tuned checkpoint's headers (merged over its
        shards), or None."""
        return self._delta.metadata()

    def info(self) -> Dict[str, Any]:
        """What ``fapm inspect --json`` prints for the delta."""
        return self._delta.info()


def load_file(
    delta: PathLike,
    base: Optional[PathLike] = None,
    framework: str = "np",
    *,
    threads: Optional[int] = None,
    memory_budget: Union[str, int, None] = None,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """Every tensor of the fine-tuned model, rebuilt from ``base`` and ``delta``, checked like
    ``fapm apply`` checks them: the same bytes that ``fapm apply`` writes, as a dict of NumPy
    arrays (``framework="np"``) or torch tensors (``"pt"``) in the model's order. ``threads``
    and ``memory_budget`` as for ``safe_open``; ``progress`` as the package's documentation
    says."""
    d = _delta(delta, threads, memory_budget, "load_file", base)
    f = safe_open(d, base, framework, memory_budget=memory_budget)
    out = {}
    names = f.keys()
    with _Bar("fapm load", sum(_out_bytes(f._delta, n) for n in names), progress) as bar:
        for name in names:
            out[name] = f.get_tensor(name)
            bar.advance(_out_bytes(f._delta, name), name)
    return out


def _out_bytes(d: _Delta, name: str) -> int:
    """The bytes of tensor ``name`` of the fine-tuned model."""
    dtype, shape, _, _, _ = d.tensor(name)
    n = 1
    for s in shape:
        n *= s
    return n * _np.itemsize(dtype)


def _to(fw, raw, dtype: str, shape):
    return fw.to_tensor(raw, dtype, shape) if hasattr(fw, "to_tensor") else fw.to_array(raw, dtype, shape)


class _Target:
    """A model or dict seen as named tensors, with the framework of each. ``names`` are the
    delta's tensor names, from which the model's renaming is found (``_names``)."""

    def __init__(self, target, rename: Rename, names: List[str] = ()):
        self.rename = rename
        self.module = None
        self.prefix = None
        # Names of a module's buffers that its state_dict leaves out: never loaded, so skipped.
        self.transient: set = set()
        if isinstance(target, Mapping):
            self.tensors = target
            self.is_dict = True
        else:
            try:
                state = target.state_dict(keep_vars=True)
            except AttributeError:
                raise TypeError(
                    "target must be a torch.nn.Module or a dict of NumPy arrays / torch tensors, "
                    f"not {type(target).__name__}"
                ) from None
            self.module = target
            self.tensors = state
            self.is_dict = False
            self.prefix = getattr(target, "base_model_prefix", None) or None
            self.transient = set(_names.non_persistent(target)) - set(state)
        self.target = target
        known = set(self.tensors) | self.transient
        self.renaming = _names.prefix_map(names, known) if names else None

    def key(self, name: str) -> Tuple[bool, Optional[str]]:
        """``(mapped, key)``: the target's key for checkpoint tensor ``name`` (None: skip it, or
        not found when not ``mapped``): ``rename`` first, then the name itself, then the name
        renamed as the model's names say (a module prefix stripped or added, found by matching
        the delta's names with the model's: a transformers model of another class, a
        sentence-transformers model), then with or without the model's ``base_model_prefix``,
        as transformers resolves them."""
        r = self.rename
        if isinstance(r, Mapping):
            if name in r:
                return True, r[name]
        elif r is not None:
            new = r(name)
            if new is None or new != name:
                return True, new
        known = self.tensors
        if name in known or name in self.transient:
            return True, name
        if self.renaming is not None:
            strip, add = self.renaming
            if name.startswith(strip):
                k = add + name[len(strip) :]
                if k in known or k in self.transient:
                    return True, k
        p = self.prefix
        if p:
            if name.startswith(p + ".") and name[len(p) + 1 :] in known:
                return True, name[len(p) + 1 :]
            if p + "." + name in known:
                return True, p + "." + name
        return False, None

    def fw(self, value):
        import numpy

        if isinstance(value, numpy.ndarray):
            return _np
        from . import torch as _pt

        if isinstance(value, _pt.torch.Tensor):
            return _pt
        raise TypeError(f"not a NumPy array or torch tensor: {type(value).__name__}")

    def default_fw(self):
        """The framework of new entries: torch for a module, else that of the dict's values."""
        if not self.is_dict:
            from . import torch as _pt

            return _pt
        return next((self.fw(v) for v in self.tensors.values()), _np)

    def set(self, key: str, value) -> None:
        """Puts ``value`` under ``key``: a dict entry, or a module's parameter data / buffer."""
        if self.is_dict:
            self.tensors[key] = value
            return
        import torch

        owner_name, _, attr = key.rpartition(".")
        owner = self.module.get_submodule(owner_name) if owner_name else self.module
        current = getattr(owner, attr)
        if isinstance(current, torch.nn.Parameter):
            with torch.no_grad():
                current.data = value
        else:
            owner._buffers[attr] = value
        self.tensors[key] = getattr(owner, attr)

    def remove(self, key: str) -> None:
        del self.tensors[key]


class _Step:
    """One tensor's change to a target, and how to undo it."""

    def __init__(self, kind: str, name: str, key: str, value=None, fw=None):
        self.kind, self.name, self.key, self.value, self.fw = kind, name, key, value, fw
        self.saved = None


def _plan(d: _Delta, tgt: _Target, check_base: bool, label: str) -> List[_Step]:
    """What patching ``tgt`` with ``d`` does to each tensor, every name, dtype and shape
    checked before anything is written. A tensor of the delta's result's dtype and shape where
    the base's differ suggests a model patched already: with ``check_base``, the base hashes of
    the other tensors say so for sure ("already holds the delta's result") before that
    tensor's own error is raised."""
    steps: List[_Step] = []
    suspect: Optional[FapmError] = None
    for name in d.names():
        dtype, shape, mode, base_dtype, _ = d.tensor(name)
        mapped, key = tgt.key(name)
        if mapped and key is None or key in tgt.transient:
            # Skipped; a buffer the model does not save (position ids) is not loaded either.
            continue
        if mapped and key not in tgt.tensors:
            raise _error(f"tensor '{name}': rename maps it to '{key}', which the target does not have")
        value = tgt.tensors[key] if mapped else None
        fw = tgt.fw(value) if value is not None else None
        where = f"target tensor '{key}'" if key == name or key is None else f"target tensor '{key}' (for '{name}')"
        if value is not None:
            vdtype, vshape = fw.dtype_name(value), list(value.shape)
        if base_dtype is not None:
            if value is None:
                raise _error(
                    f"tensor '{name}': not in the target, which must hold the base tensor "
                    "(map it with rename=, or skip it with rename={name: None})"
                )
            bshape = list(d.base_shape(name))
            if vdtype != base_dtype or vshape != bshape:
                wrong = f"{where}: is {vdtype} {vshape}, but the delta was made against {base_dtype} {bshape}"
                if (vdtype, vshape) != (dtype, list(shape)):
                    raise _error(wrong)
                # The fine-tuned tensor's dtype and shape: patched already?
                suspect = suspect or _error(wrong + " (the dtype and shape of the delta's result: was the model patched already?)")
                continue
            # A tensor that changes dtype, or grows (added tokens), gets a new buffer.
            in_place = dtype == base_dtype and bshape == list(shape)
            steps.append(_Step("patch" if in_place else "replace", name, key, value, fw))
        elif value is None:
            if not tgt.is_dict:
                raise _error(
                    f"tensor '{name}': stored whole in the delta but not in the model "
                    "(map it with rename=, or skip it with rename={name: None})"
                )
            steps.append(_Step("add", name, name))
        else:
            same = vdtype == dtype and vshape == list(shape)
            steps.append(_Step("overwrite" if same else "replace", name, key, value, fw))
    if suspect is not None:
        if check_base:
            for s in steps:
                if s.kind == "patch":
                    d.check_base(s.name, _bytes(s, False), f"{label} '{s.key}'")
        raise suspect
    return steps


def _bytes(step: _Step, writable: bool):
    try:
        return step.fw.as_bytes(step.value, writable)
    except ValueError as e:
        raise _error(f"target tensor '{step.key}': {e}") from None


def _run(d: _Delta, tgt: _Target, step: _Step, label: str, done: List[_Step]) -> None:
    """Applies one step and records it in ``done``, which must hold every step that may have
    changed the target even when a Ctrl-C is raised at any point: a patch is recorded by the
    Rust call as it returns; other steps are recorded before they change anything, and their
    undo is harmless where they did not."""
    if step.kind == "patch":
        finished: List[str] = []
        try:
            d.patch(step.name, _bytes(step, True), False, label, finished)
        finally:
            if finished:
                done.append(step)
        return
    dtype, shape, _, base_dtype, _ = d.tensor(step.name)
    fw = step.fw or tgt.default_fw()
    base = _bytes(step, False) if base_dtype is not None else None
    new = _to(fw, d.reconstruct(step.name, base, label), dtype, shape)
    if step.kind == "overwrite":
        step.saved = fw.copy(step.value)
        done.append(step)
        _bytes(step, True)[:] = fw.as_bytes(new, False)
    else:
        # A module's parameter stays, its .data is replaced: keep the old .data.
        step.saved = step.value if (tgt.is_dict or step.value is None) else step.value.data
        done.append(step)
        tgt.set(step.key, new)


def _undo_all(d: _Delta, tgt: _Target, done: List[_Step]) -> Optional[FapmError]:
    """Undoes every step in ``done``, last first, going on past the ones that fail; returns
    None, or one ``FapmError`` naming every tensor that could not be restored (left as the
    failed undo left it, neither base nor fine-tuned for a patch)."""
    failed = []
    for s in reversed(done):
        try:
            _undo(d, tgt, s)
        except Exception as e:  # noqa: BLE001 - every undo is tried; all failures are reported
            failed.append(f"'{s.key}' ({e})")
    if not failed:
        return None
    return _error(f"could not restore {len(failed)} tensor(s) to the base: " + "; ".join(failed))


def _undo(d: _Delta, tgt: _Target, step: _Step) -> None:
    if step.kind == "patch":
        d.revert(step.name, _bytes(step, True))
    elif step.kind == "overwrite":
        _bytes(step, True)[:] = step.fw.as_bytes(step.saved, False)
    elif step.kind == "replace":
        tgt.set(step.key, step.saved)
    elif step.key in tgt.tensors:
        tgt.remove(step.key)


def _swapped(call: str, model, delta) -> None:
    """Raises when ``call`` was given a path where the model goes and a model as the delta."""
    if _is_path(model) and not _is_path(delta) and not isinstance(delta, _Delta):
        raise _error(
            f"{call}: the model given is a path ({os.fspath(model)}) and the delta a {type(delta).__name__}: "
            f"the arguments are swapped ({call}(model, delta))"
        )


def _patch(
    target,
    delta,
    check_base: bool,
    rename: Rename,
    threads: Optional[int],
    memory_budget: Union[str, int, None],
    progress: Optional[bool],
    call: str,
) -> Tuple[_Delta, _Target, List[_Step]]:
    _swapped(call, target, delta)
    d = _delta(delta, threads, memory_budget, call)
    names = d.names()
    tgt = _Target(target, rename, names)
    label = "target" if tgt.is_dict else type(target).__name__
    steps = _plan(d, tgt, check_base, label)
    checks = [s for s in steps if check_base and s.kind in ("patch", "replace") and d.tensor(s.name)[3] is not None]
    total = sum(_bytes(s, False).nbytes for s in checks) + sum(_out_bytes(d, s.name) for s in steps)
    done: List[_Step] = []
    with _Bar("fapm patch", total, progress) as bar:
        for s in checks:
            b = _bytes(s, False)
            d.check_base(s.name, b, f"{label} '{s.key}'")
            bar.advance(b.nbytes, s.key)
        try:
            for s in steps:
                _run(d, tgt, s, f"{label} '{s.key}'", done)
                bar.advance(_out_bytes(d, s.name), s.key)
        except BaseException as e:
            failed = _undo_all(d, tgt, done)
            if failed is not None:
                raise failed from e
            raise
    return d, tgt, done


def patch_(
    target,
    delta: PathLike,
    *,
    check_base: bool = True,
    rename: Rename = None,
    threads: Optional[int] = None,
    memory_budget: Union[str, int, None] = None,
    progress: Optional[bool] = None,
):
    """Turns ``target``, which holds the base model, into the fine-tune in place: bit for bit
    the tensors ``fapm apply`` writes. Returns ``target``.

    ``target`` is a ``torch.nn.Module`` (its ``state_dict()`` names: a transformers model, a
    sentence-transformers model, ...) or a dict of NumPy arrays / torch tensors (contiguous, on
    the CPU). A checkpoint name is looked up as ``rename`` says (a dict, or a function of the
    name; mapping to None skips the tensor), else as it is, else with the module prefix that
    the model's names show stripped or added (found by matching the delta's names with the
    model's: ``0.auto_model.`` or ``0.model.`` in a sentence-transformers model, ``bert.``
    between ``BertModel`` and ``BertForSequenceClassification``), else with or without the model's
    ``base_model_prefix``, as transformers does. Tensors the delta does not hold are left
    alone; tensors it stores whole replace the target's (a dict gains the ones it lacks). A
    delta tensor that is a buffer the model does not save (``persistent=False``, such as
    ``position_ids``) is skipped, as transformers skips it when loading a checkpoint.

    With ``check_base`` (the default) every targeted tensor is hashed and compared with the
    base the delta was made from before anything is written: one mismatch and nothing is
    modified, and the ``FapmError`` names the tensor. Pruned tensors are patched where they
    are, a block at a time (no second copy of the model); every result is checked against its
    recorded hash. A failure or Ctrl-C part way puts back everything already changed (if some
    of that fails, every other tensor is still put back, and the ``FapmError`` names the ones
    that could not be). A model that holds the delta's result already (patched before) is
    refused with a message that says so. ``threads`` and ``memory_budget`` as for
    ``safe_open``, ``progress`` as the package's documentation says; a part of a partitioned
    prune is refused.
    """
    _patch(target, delta, check_base, rename, threads, memory_budget, progress, "patch_")
    return target


@contextlib.contextmanager
def patched(
    target,
    delta: PathLike,
    *,
    check_base: bool = True,
    rename: Rename = None,
    threads: Optional[int] = None,
    memory_budget: Union[str, int, None] = None,
    progress: Optional[bool] = None,
):
    """``patch_`` for the duration of a ``with`` block, then the base again, also when the
    block raises: one loaded base serves many fine-tunes in turn::

        with fapm.patched(model, "math.fapm"):
            model.generate(...)

    The base is restored from the delta itself: its values are differences from the base, so
    the patch is undone exactly at the positions it changed, and nothing but the tensors the
    delta stores whole (and the originals of tensors it changes in dtype or shape) is kept
    aside. Changes that code inside the block makes to the weights are not undone, and at the
    patched positions they leave neither base nor fine-tuned values.

    On exit every tensor that can be restored is restored, even when some cannot (a target
    replaced by one of another shape inside the block, say); then one ``FapmError`` names every
    tensor that could not be (chained to the block's own exception, if it raised one).
    """
    d, tgt, done = _patch(target, delta, check_base, rename, threads, memory_budget, progress, "patched")
    try:
        yield target
    finally:
        failed = _undo_all(d, tgt, done)
        if failed is not None:
            raise failed


def iter_patches(
    delta: PathLike,
    base,
    names: Optional[List[str]] = None,
    framework: Optional[str] = None,
    rename: Rename = None,
    *,
    threads: Optional[int] = None,
    memory_budget: Union[str, int, None] = None,
    progress: Optional[bool] = None,
) -> Iterator[Tuple[str, Any, Any]]:
    """Yields ``(name, indices, values)`` for each tensor of the delta (or of ``names``), for
    engines that take sparse updates: ``indices`` are the flat (row-major) int64 positions the
    fine-tune changes, ascending, and ``values`` the fine-tuned values there, in the fine-tuned
    dtype; writing them into the base tensor gives the fine-tuned tensor. A tensor the delta
    stores whole comes as ``(name, None, tensor)``, the whole tensor with its shape.

    The delta stores each value as a difference from the base value, so the base is needed:
    ``base`` is the base checkpoint's path, or the model / dict of arrays that holds it (names
    resolved as ``patch_`` resolves them, with ``rename``). Every hash is checked as in
    ``load_file``. ``framework`` is ``"np"`` or ``"pt"``; by default ``"pt"`` when ``base``
    holds torch tensors, else ``"np"``. ``threads`` and ``memory_budget`` as for ``safe_open``,
    ``progress`` as the package's documentation says (the bar lasts as long as the iteration);
    a part of a partitioned prune is refused (on the call, before the first tensor).
    """
    _swapped("iter_patches", base, delta)
    d = _delta(delta, threads, memory_budget, "iter_patches", base)
    tgt, src = None, None
    if _is_path(base):
        src = _checkpoint(base, memory_budget, d)
    else:
        tgt = _Target(base, rename, d.names())
    if framework is None:
        framework = "np"
        if tgt is not None and any(tgt.fw(v) is not _np for v in tgt.tensors.values()):
            framework = "pt"
    return _iter_patches(d, src, tgt, names, _framework(framework), progress)


def _iter_patches(d: _Delta, src, tgt, names, fw, progress) -> Iterator[Tuple[str, Any, Any]]:
    names = d.names() if names is None else names
    with _Bar("fapm patches", sum(_out_bytes(d, n) for n in names), progress) as bar:
        for name in names:
            yield _one_patch(d, src, tgt, name, fw)
            bar.advance(_out_bytes(d, name), name)


def _one_patch(d: _Delta, src, tgt, name: str, fw) -> Tuple[str, Any, Any]:
    dtype, shape, _, base_dtype, _ = d.tensor(name)
    if base_dtype is None:
        return name, None, _to(fw, d.reconstruct(name, None), dtype, shape)
    label = "base"
    if tgt is not None:
        step = _plan_one(d, tgt, name)
        src, label = _bytes(step, False), f"base '{step.key}'"
    if list(d.base_shape(name)) != list(shape):
        # Added tokens: the tensor grows, so it comes whole, like a tensor stored whole.
        return name, None, _to(fw, d.reconstruct(name, src, label), dtype, shape)
    indices, values = d.patches(name, src, label)
    if fw is not _np:
        indices = fw.torch.from_numpy(indices)
    return name, indices, _to(fw, values, dtype, [len(indices)])


def _plan_one(d: _Delta, tgt: _Target, name: str) -> _Step:
    mapped, key = tgt.key(name)
    if not mapped or key is None or key not in tgt.tensors:
        raise _error(f"tensor '{name}': not in the base given (map it with rename=)")
    value = tgt.tensors[key]
    step = _Step("patch", name, key, value, tgt.fw(value))
    _, _, _, base_dtype, _ = d.tensor(name)
    shape = list(d.base_shape(name))
    if step.fw.dtype_name(value) != base_dtype or list(value.shape) != shape:
        raise _error(
            f"base tensor '{key}': is {step.fw.dtype_name(value)} {list(value.shape)}, "
            f"but the delta was made against {base_dtype} {shape}"
        )
    return step
