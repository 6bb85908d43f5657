"""Progress bars for fapm's long calls, shown as ``huggingface_hub`` shows its downloads: tqdm's
(``tqdm.auto``: a widget in a notebook, a line on stderr in a terminal) when tqdm is installed,
nothing when it is not.

A bar counts input bytes (what the command line's bar counts) and shows the tensor being
worked on. ``progress=False`` on a call, or ``FAPM_NO_PROGRESS=1`` or
``HF_HUB_DISABLE_PROGRESS_BARS=1`` in the environment (tqdm's own ``TQDM_DISABLE=1`` too),
turns bars off; ``progress=True`` shows one at once, whatever the environment says. By default
(``progress=None``) a bar appears only once a call has taken more than a second, so quick
calls print nothing. tqdm is imported only when a bar is made.
"""

from __future__ import annotations

import os
from typing import Any, Optional

# Environment variables that turn the bars off: fapm's own, and huggingface_hub's.
DISABLE_VARS = ("FAPM_NO_PROGRESS", "HF_HUB_DISABLE_PROGRESS_BARS")
# Seconds before a bar appears when it was not asked for.
DELAY = 1.0


def _true(value: Optional[str]) -> bool:
    # As huggingface_hub reads its boolean variables.
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


def enabled(progress: Optional[bool]) -> bool:
    """Whether a call given ``progress=`` shows a bar (before asking whether tqdm is there)."""
    if progress is None:
        return not any(_true(os.environ.get(v)) for v in DISABLE_VARS)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, not {type(progress).__name__}")
    return progress


def tqdm_class() -> Any:
    """``tqdm.auto.tqdm``, or None when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class Bar:
    """A bar of bytes, or nothing (see the module's documentation). A bar whose total is not
    known yet (0) is made at the first report, with the total it brings: tqdm's delay counts
    from then, and no bar is drawn before its size is known."""

    def __init__(self, desc: str, total: int, progress: Optional[bool]):
        self._bar: Any = None
        self._make: Any = None
        self._current = ""
        if not enabled(progress):
            return
        cls = tqdm_class()
        if cls is None:
            return
        delay = 0 if progress else DELAY

        def make(total: int) -> Any:
            return cls(total=total or None, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, delay=delay)

        if total:
            self._bar = make(total)
        else:
            self._make = make

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update_to(self, done: int, total: int, current: str = "") -> None:
        """The work is at ``done`` of ``total`` bytes (0: not known yet), on tensor ``current``."""
        if self._bar is None:
            if self._make is None:
                return
            self._bar, self._make = self._make(total), None
        bar = self._bar
        if total and bar.total != total:
            bar.total = total
        if current and current != self._current:
            from ._fapm import _one_line

            self._current = current
            bar.set_postfix_str(_one_line(current), refresh=False)
        if done != bar.n:
            bar.update(done - bar.n)

    def advance(self, n: int, current: str = "") -> None:
        """``n`` more bytes done, on tensor ``current``."""
        if self._bar is not None:
            self.update_to(self._bar.n + n, self._bar.total or 0, current)

    def callback(self):
        """A ``progress(done, total, current)`` callable for the Rust calls, or None."""
        return self.update_to if self._bar is not None or self._make is not None else None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = self._make = None
