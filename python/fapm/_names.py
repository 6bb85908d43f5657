"""How a delta's tensor names find a model's, when the model wraps the checkpoint's module under
other names.

A checkpoint names tensors as the model class that saved it does (``bert.encoder...`` for
``BertForSequenceClassification``, ``encoder...`` for ``BertModel``), and the model in memory
may be another class of the same weights: transformers resolves this with the class's
``base_model_prefix``, and a sentence-transformers model holds the transformer one or two
modules down (``0.auto_model.``, ``0.model.``, depending on its version). Rather than know each
library's layout, the renaming is found by matching: the pair (prefix to strip from a delta
name, prefix to add) under which the most delta names land on one of the model's names, each
delta name paired with the model names that end with the longest dotted tail of it.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple


def prefix_map(names: Iterable[str], keys: Iterable[str]) -> Optional[Tuple[str, str]]:
    """``(strip, add)``: delta name ``strip + rest`` is the model's ``add + rest``, for the
    most delta names that are not model names already; None when no renaming matches any."""
    keys = set(keys)
    # Model names by their dotted tails: "a.b.c" is found under "a.b.c", "b.c" and "c".
    tails: Dict[str, List[str]] = {}
    for k in keys:
        i = 0
        while True:
            tails.setdefault(k[i:], []).append(k[:i])
            j = k.find(".", i)
            if j < 0:
                break
            i = j + 1
    votes: Counter = Counter()
    for n in names:
        if n in keys:
            continue
        i = 0
        while True:
            # The longest tail of n (with at least one dot: "weight" alone says nothing) that
            # ends model names; a tail that ends several is no evidence of one renaming.
            rest = n[i:]
            if "." not in rest:
                break
            found = tails.get(rest)
            if found:
                if len(found) == 1:
                    votes[(n[:i], found[0])] += 1
                break
            i = n.index(".", i) + 1
    if not votes:
        return None
    # The most votes; among equals, the shortest renaming, then the first in text order.
    return min(votes, key=lambda p: (-votes[p], len(p[0]) + len(p[1]), p))


def non_persistent(module) -> List[str]:
    """The names of ``module``'s buffers that its ``state_dict`` leaves out (``persistent=False``:
    position ids, rotary frequencies), which transformers never loads from a checkpoint."""
    out = []
    for prefix, m in module.named_modules():
        for b in getattr(m, "_non_persistent_buffers_set", ()):
            out.append(f"{prefix}.{b}" if prefix else b)
    return out
