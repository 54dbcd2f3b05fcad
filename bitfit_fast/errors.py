"""`UserError`: a mistake the user can fix, which every `bitfit-fast` command reports as one line; and the checks
of values that several APIs take."""

import numbers


class UserError(Exception):
    """A mistake the user can fix (an argument, a path, data, the network, a checkpoint): the message says what is
    wrong and what to do. `bitfit-fast` prints it as one line and exits with status 2."""


def first_line(error: BaseException) -> str:
    """A library's error message cut to its first line, to quote inside a one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def quoted(value: object, limit: int = 80) -> str:
    """A value of the user's as a message quotes it: its repr, cut to ``limit`` characters (a cell can hold a whole
    column, a client's key megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def quoted_keys(keys) -> str:
    """Keys of the user's, each quoted (:func:`quoted`), the first five of them."""
    keys = list(keys)
    return ", ".join(map(quoted, keys[:5])) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")


def check_max_norm(name: str, value, none_means: str | None = None) -> None:
    """Raise unless ``value`` is a gradient norm's bound, a positive number (or None, where ``none_means`` says
    what None does): 0 would zero every gradient and a negative bound flip them."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        also = f", or None for {none_means}" if none_means is not None else ""
        raise ValueError(f"{name} bounds the gradients' norm: a positive number{also}; got {value!r}")
