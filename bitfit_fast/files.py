"""Files a crash cannot tear: everything bitfit_fast writes for a user (biases, checkpoints, run configs,
summaries, plots) goes through :func:`atomic_write`, or :func:`atomic_write_together` for files that belong
together."""

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import UserError, first_line


def temporary_beside(path: Path) -> Path:
    """A temporary name beside ``path`` (a file or directory): the same directory (a rename within it is atomic) and
    suffix (writers that pick a format by the suffix still do)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a :func:`temporary_beside` name (any process's)."""
    return re.fullmatch(r"\..+\.tmp-\d+(\.[^.]*)?", name) is not None


def temporaries_of_others(path: Path) -> list[Path]:
    """Other processes' temporaries beside ``path`` (see :func:`temporary_beside`): what a writer killed before its
    rename left (SIGKILL runs no cleanup), or one writing now. Named for the user, never removed here: whether that
    process is gone cannot be told from here (another machine may share the file system)."""
    name = re.compile(rf"\.{re.escape(path.stem)}\.tmp-\d+{re.escape(path.suffix)}")
    mine = temporary_beside(path)
    return sorted(p for p in path.parent.iterdir() if name.fullmatch(p.name) and p != mine)


def check_can_write(directory: Path, named: str) -> None:
    """Before any work: ``directory`` is, or can be made, a directory this process writes in (its nearest existing
    ancestor is a writable directory), else one line naming it as ``named`` (e.g. the option that gave it)."""
    directory = Path(directory).absolute()
    existing = next(path for path in (directory, *directory.parents) if path.exists() or path.is_symlink())
    if not existing.exists():  # no directory can be made where a link points nowhere
        target = existing.parent / os.readlink(existing)
        raise UserError(f"{named} cannot be created: {existing} is a symbolic link to {target}, which leads to no "
                        "file or directory; point it at a directory, or choose another")
    if not existing.is_dir():
        raise UserError(f"{named} cannot be created: {existing} is a file; choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{named} cannot be written: this user may not write in {existing}; choose another "
                        "directory")


def _flush_to_disk(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the data is on disk before a rename makes it the file
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(temporary_path)``: a temporary file beside ``path`` is written, flushed to disk
    and renamed over ``path``. A crash or an error leaves the old file (or none), never a torn one; on an error the
    temporary file is removed and the error raised. Returns ``path``."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        write(tmp)
        _flush_to_disk(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_together(contents: dict[Path, bytes]) -> None:
    """Write files that belong together (a checkpoint's weights and config): every one is written to its temporary
    file and flushed to disk before any is renamed into place, so an error while writing (a full disk) leaves every
    old file as it was; an error while renaming puts the files already renamed back (from a second name each old
    file gets first; one that cannot be put back keeps that second name, named in the error). Only a crash between
    the renames, microseconds apart, could pair a new file with an old one; a reader that must know compares a hash
    one file records of the other."""
    temporaries = {Path(path): temporary_beside(Path(path)) for path in contents}
    olds: dict[Path, Path | None] = {}
    try:
        for path, data in contents.items():
            temporaries[Path(path)].write_bytes(data)
            _flush_to_disk(temporaries[Path(path)])
        for path in temporaries:  # one at a time: a failure here leaves the others to the cleanup below
            olds[path] = _second_name(path)
        renamed = []
        try:
            for path, tmp in temporaries.items():
                os.replace(tmp, path)
                renamed.append(path)
        except BaseException as error:
            stranded = []
            for path in renamed:
                try:
                    if olds[path] is None:
                        path.unlink()
                    else:
                        os.replace(olds[path], path)
                except OSError:
                    old = olds.pop(path)
                    stranded.append(f"{path} ({f'its previous file is {old}' if old else 'it had none before'})")
            if stranded:
                raise OSError(f"{first_line(error)}; and what was renamed could not be put back: "
                              f"{', '.join(stranded)}") from error
            raise
    finally:
        for tmp in (*temporaries.values(), *filter(None, olds.values())):
            tmp.unlink(missing_ok=True)


def _second_name(path: Path) -> Path | None:
    """A second name for the file at ``path`` (a hard link, or a copy where the file system has none) beside it,
    that a rename over ``path`` leaves; None where there is no file."""
    if not path.is_file():
        return None
    second = temporary_beside(path.with_suffix(".old" + path.suffix))
    second.unlink(missing_ok=True)
    try:
        os.link(path, second)
    except OSError:
        shutil.copy2(path, second)
    return second


def json_text(record) -> str:
    """``record`` as bitfit_fast writes JSON: indented, with a final newline."""
    return json.dumps(record, indent=2) + "\n"


def write_json(path: str | os.PathLike, record) -> Path:
    """``record`` as JSON (:func:`json_text`), written atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(json_text(record)))
