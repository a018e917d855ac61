"""User-facing errors: each says what is wrong, where, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DNIError(Exception):
    """An error caused by the user's input (spec, model, data, flags).

    The command line prints it without a traceback and exits with code 2.
    """


class SpecError(DNIError):
    """The spec file is malformed or names something that does not exist."""


class ModelError(DNIError):
    """The model file could not be loaded, built, or traced."""


class PartitionError(DNIError):
    """The cuts do not split the model into valid stages."""


class DataError(DNIError):
    """A data set is missing or malformed."""


# characters people type for one another: letter O for zero, l or I for one, `_` and `-` for `.`
_CONFUSABLE = str.maketrans({"o": "0", "l": "1", "i": "1", "_": ".", "-": "."})


def _normalize(name: str) -> str:
    return name.lower().translate(_CONFUSABLE)


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Near-misses of `name` among `candidates`, best first.

    Candidates equal to `name` up to case, look-alike characters (`O`/`0`, `l`/`1`) and separators (`_`/`.`)
    come first and alone; otherwise the closest by edit similarity, then those containing or contained in it.
    """
    name = str(name)
    candidates = [str(c) for c in dict.fromkeys(candidates) if str(c) != name]
    key = _normalize(name)
    close = [c for c in candidates if _normalize(c) == key][:n]
    if not close:
        close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not close:
        # module paths like `layers.1` vs `layer.1`: also try containment, between names of similar length
        lowered = name.lower()
        close = [
            c
            for c in candidates
            if lowered
            and (lowered in c.lower() or c.lower() in lowered)
            and 2 * min(len(c), len(name)) >= max(len(c), len(name))
        ][:n]
    return close


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' suffix for near-misses of `name` (see close_matches), or ''."""
    close = close_matches(name, candidates, n)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
