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


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' suffix for near-misses of `name`, or ''."""
    candidates = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not close:
        # module paths like `layers.1` vs `layer.1`: also try on the last component
        lowered = name.lower()
        close = [c for c in candidates if lowered and (lowered in c.lower() or c.lower() in lowered)][:n]
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
