"""`UserError`: a mistake the user can fix, which every `bitfit-fast` command reports as one line."""


class UserError(Exception):
    """A mistake the user can fix (an argument, a path, data, the network, a checkpoint): the message says what is
    wrong and what to do. `bitfit-fast` prints it as one line and exits with status 2."""


def first_line(error: BaseException) -> str:
    """A library's error message cut to its first line, to quote inside a one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
