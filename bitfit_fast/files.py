"""Files a crash cannot tear: everything bitfit_fast writes for a user (biases, checkpoints, run configs,
summaries, plots) goes through :func:`atomic_write`."""

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(temporary_path)``: a temporary file beside ``path`` (same directory and suffix,
    so writers that pick a format by the suffix still do) is written, flushed to disk and renamed over ``path``. A
    crash or an error leaves the old file (or none), never a torn one; on an error the temporary file is removed and
    the error raised. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the data is on disk before the rename makes it the file
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, record) -> Path:
    """``record`` as indented JSON with a final newline, written atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
