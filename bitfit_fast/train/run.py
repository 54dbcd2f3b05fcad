"""A run directory and the state that continues a run: its file names, run_config.json (written when a run starts,
read by eval and predict), and checkpoint.pt (trained parameters, optimizer, loss scaler, every process's RNG
state and the data position), written atomically."""

import contextlib
import dataclasses
import errno
import json
import os
import random
import zipfile
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ..checkpoint import CONFIG_NAME, RUN_CONFIG_NAME, WEIGHTS_NAME, base_sample, other_base_weight, read_base_sample
from ..errors import UserError, first_line
from ..files import atomic_write, check_can_write, is_temporary, write_json
from .config import TrainConfig
from .distributed import Dist, barrier, gather

CHECKPOINT_NAME = "checkpoint.pt"
SUMMARY_NAME = "run_summary.json"
SWEEP_SUMMARY_NAME = "sweep_summary.json"
CURVES_NAME = "learning_curves.png"
BEST_BIASES = "biases"  # the epoch with the best validation score: what eval and predict load
LAST_BIASES = "biases-last"
NOT_A_RUN_HINT = "pass the --output-dir of a `bitfit-fast train` run"
# Locked by the process training the run, from its checks to its end: no other starts or continues a run there
# meanwhile (a command launched twice, a job retried while it still runs). The system drops the lock of a process
# that dies, SIGKILL included; the file, then left, means nothing.
LOCK_NAME = ".train.lock"


def _lock(descriptor: int, out: Path) -> None:
    """Take the lock of ``descriptor`` (an open lock file of ``out``), or one line saying another run holds it.
    Where the system or the file system has no locks (Windows, some network mounts), nothing: runs go unlocked."""
    if fcntl is None:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"--output-dir {out} is in use: another bitfit-fast train is running there; wait for it to "
                        "end, or choose another --output-dir") from None
    except OSError as error:
        if error.errno not in NO_LOCKS:
            raise


# What flock raises on a file system without locks.
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def _open_lock_file(out: Path, create: bool) -> int | None:
    """A descriptor of ``out``'s lock file (created where ``create``), or None where there is none. Opened to write
    (NFS locks only such a file), else, another user's, to read."""
    path = out / LOCK_NAME
    flags = os.O_CREAT if create else 0
    try:
        try:
            return os.open(path, os.O_RDWR | flags, 0o666)
        except PermissionError:
            return os.open(path, os.O_RDONLY | flags, 0o666)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # no directory, a file or a link loop there:
            return None  # the checks after say so
        raise


def _is_the_lock_file(descriptor: int, out: Path) -> bool:
    """Whether ``descriptor`` is the file now at ``out``'s lock file path (a run removes its own as it ends)."""
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(out / LOCK_NAME))
    except FileNotFoundError:
        return False


def check_not_in_use(out: Path) -> None:
    """Before anything loads: no other process trains in ``out`` now (see :func:`claimed`)."""
    descriptor = _open_lock_file(out, create=False)
    if descriptor is not None:
        try:
            _lock(descriptor, out)
        finally:
            os.close(descriptor)  # and the lock with it


def _make_directories(out: Path, created: list[Path]) -> None:
    """``out`` and its missing parents, each one this process makes added to ``created``. FileNotFoundError where
    a parent was removed meanwhile (by a run that failed to start)."""
    for path in reversed((out, *out.parents)):
        if path.is_dir():
            continue
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            if not path.exists() and not path.is_symlink():  # removed again as soon as made
                raise FileNotFoundError(path) from None
            if not path.is_dir():
                raise


@contextlib.contextmanager
def claimed(out: Path):
    """``out`` locked for this process's run (see LOCK_NAME), created where new. Whatever the run ends in, the lock
    file is removed, and so are the directories it created that it leaves empty (a run that fails to start leaves
    none behind). Check the directory again inside: another run may have written there before the lock."""
    created: list[Path] = []
    try:
        while True:  # again where a run that held out, ending, removed its lock file or out itself meanwhile
            try:
                _make_directories(out, created)
            except FileNotFoundError:
                continue
            descriptor = _open_lock_file(out, create=True)
            if descriptor is None:
                continue
            try:
                _lock(descriptor, out)
            except BaseException:
                os.close(descriptor)
                raise
            if _is_the_lock_file(descriptor, out):
                break
            os.close(descriptor)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # gone, or another user's in a sticky directory
                (out / LOCK_NAME).unlink()
            os.close(descriptor)
    finally:
        for directory in sorted(created, key=lambda path: len(path.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: the run's (or made again by another run)
                directory.rmdir()


def check_output_dir(out: Path, resume: bool, locked: bool = False) -> None:
    """Before anything loads: no other run is training there, a run is only continued on purpose, never
    overwritten (a joint run's tasks hold no checkpoint, only biases and a summary), ``out`` can be written, and a
    new run starts where nothing else is. ``locked``: this process holds ``out`` (:func:`claimed`), or the main
    process of its torchrun does."""
    if not locked:
        check_not_in_use(out)
    check_holds_no_run(out, resume)
    if not resume:
        check_empty(out)


def check_holds_no_run(out: Path, resume: bool) -> None:
    """:func:`check_output_dir` but for what else ``out`` holds: it can be written and holds no run or biases that
    a new run would overwrite (with ``resume``, a run that can be continued)."""
    checkpoint = out / CHECKPOINT_NAME
    check_can_write(out, f"--output-dir {out}")
    if not resume:  # as save_biases and export refuse: a run's directory is its training's alone
        run = next((parent for parent in out.resolve().parents if is_run_record(parent / RUN_CONFIG_NAME)), None)
        if run is not None:
            raise UserError(f"--output-dir {out} is inside the run {run}, whose files only its training writes: "
                            "choose a directory outside it")
    saved = next((name for name in (BEST_BIASES, LAST_BIASES, SUMMARY_NAME) if _holds_saved(out / name)), None)
    if resume and not checkpoint.is_file():
        if saved is not None:  # a joint run's task: trained, but with no checkpoint to go on from
            raise UserError(f"--resume: {out} holds a finished run without a checkpoint ({saved}, no "
                            f"{CHECKPOINT_NAME}; a --task-files run's tasks keep none): it cannot be continued; train "
                            "into another --output-dir")
        raise UserError(f"--resume: no checkpoint at {checkpoint}; leave out --resume to start a new run there")
    if not resume and checkpoint.exists():
        raise UserError(f"{out} already holds a run ({CHECKPOINT_NAME}): continue it with --resume, or choose another "
                        "--output-dir (or remove that run first)")
    if not resume and saved is not None:
        raise UserError(f"{out} already holds a run ({saved}): choose another --output-dir (or remove that run first)")
    biases = next((name for name in (WEIGHTS_NAME, CONFIG_NAME) if (out / name).exists()), None)
    if biases is not None:  # a run there would hide them: TaskBank, eval and serve read a run's biases/
        raise UserError(f"{out} holds biases saved by save_biases ({biases}): choose another --output-dir")


def check_empty(out: Path) -> None:
    """``out`` is new or empty, where a new run starts."""
    held = sorted(path.name for path in out.iterdir() if path.name != LOCK_NAME) if out.is_dir() else []
    # A run that stopped before its first checkpoint (a NaN loss, Ctrl-C) left its record alone: it starts again.
    if held and not (held == [RUN_CONFIG_NAME] and is_run_record(out / RUN_CONFIG_NAME)):
        leftovers = _killed_saves_leftovers(out, held)
        if leftovers:  # SIGKILL mid-save runs no cleanup
            raise UserError(f"--output-dir {out} holds what a run killed while saving left ({', '.join(leftovers)}): "
                            "delete it, unless a run is still writing there, and run the command again")
        # A run writes run_config.json, learning_curves.png, ... over whatever of that name is there.
        raise UserError(f"--output-dir {out} is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                        "a run starts in a new or empty directory; choose another")


def temporaries_in(out: Path) -> list[str]:
    """What saves killed before their renames left in the run directory ``out`` (and its biases/ directories), by
    path within it. Named for the user, not removed: a temporary may hold a whole checkpoint that was never
    renamed."""
    return [str(path.relative_to(out)) for directory in (out, out / BEST_BIASES, out / LAST_BIASES)
            if directory.is_dir() for path in sorted(directory.iterdir()) if is_temporary(path.name)]


def _holds_saved(path: Path) -> bool:
    """Whether ``path`` is a file, or a directory holding more than temporaries (a save killed before its rename)."""
    return path.is_file() or path.is_dir() and any(not is_temporary(entry.name) for entry in path.iterdir())


def _killed_saves_leftovers(out: Path, held: list[str]) -> list[str]:
    """What a run killed while saving left in ``out`` (its temporaries, and biases directories holding only theirs),
    where that is all ``out`` holds beside the run's record; else none."""
    leftovers = []
    for name in held:
        path = out / name
        if is_temporary(name):
            leftovers.append(name)
        elif name in (BEST_BIASES, LAST_BIASES) and path.is_dir() and not _holds_saved(path):
            leftovers += [f"{name}/{entry.name}" for entry in sorted(path.iterdir())] or [f"{name}/"]
        elif name != RUN_CONFIG_NAME:
            return []
    return leftovers


def check_holds_only(out: Path, allowed: set[str], kind: str) -> None:
    """``out`` holds nothing but ``allowed`` names (a sweep's or a joint run's own), where a ``kind`` (its name
    for the message) starts."""
    ignored = {*allowed, LOCK_NAME}
    others = sorted(path.name for path in out.iterdir() if path.name not in ignored) if out.is_dir() else []
    if others:
        raise UserError(f"--output-dir {out} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
                        f"): a {kind} starts in a new or empty directory; choose another")


def is_run_record(file: Path) -> bool:
    """Whether ``file`` is a run_config.json that `bitfit-fast train` wrote."""
    try:
        record = json.loads(file.read_text())
        TrainConfig.from_dict(record["config"])
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


# What may change when a run continues: how long it trains, what it shows, how a batch is split (its gradient is
# the same), where the run is named from, and the machine's choices of kernels and memory (the same arithmetic).
CONTINUABLE_OPTIONS = {"epochs", "resume", "progress", "save_every", "micro_batch_size", "output_dir"}
CONTINUABLE_BITFIT_OPTIONS = {"backend", "memory"}


def check_same_options(out: Path, config: TrainConfig, unknown_yet: tuple[str, ...] = ()) -> tuple:
    """A run goes on only with the options it started with, but for ``CONTINUABLE_OPTIONS`` (and ``unknown_yet``,
    options the data decides); returns the classes it records, (num_labels, label_names). ``config`` has absolute
    paths and a resolved precision, as the run's run_config.json has."""
    file = out / RUN_CONFIG_NAME
    try:
        record = json.loads(file.read_text())
        started = TrainConfig.from_dict(record["config"]).to_dict()
        classes = record["num_labels"], record["label_names"]
    except PermissionError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--resume: {file} could not be read ({first_line(error)}): start a new run in another "
                        "--output-dir") from error
    now = config.to_dict()
    for options in (started, now):
        options.update({f"bitfit.{k}": v for k, v in options.pop("bitfit").items()
                        if k not in CONTINUABLE_BITFIT_OPTIONS})
    def shown(value) -> str:
        return "unset" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)

    changed = [f"{key} {shown(now[key])} (the run: {shown(started.get(key))})" for key in now
               if key not in CONTINUABLE_OPTIONS and key not in unknown_yet and now[key] != started.get(key)]
    if changed:
        raise UserError(f"--resume continues {out} as it started, but these options differ from the run's: "
                        f"{', '.join(changed[:3])}: give the run's options, or start a new run in another "
                        "--output-dir")
    return classes


def check_continues(out: Path, config: TrainConfig, num_labels: int, label_names: list[str] | None) -> None:
    """--resume continues a run exactly as it started: its options (:func:`check_same_options`) and the classes
    recorded in its run_config.json."""
    started_with = check_same_options(out, config)
    if (num_labels, label_names) != started_with:
        raise UserError(f"--resume: the training data's classes {label_names} are not those {out} started with, "
                        f"{started_with[1]}: give the run's data")


@dataclasses.dataclass
class Run:
    """What eval and predict need from a run's run_config.json."""

    path: Path
    config: TrainConfig
    model_path: str
    num_labels: int
    label_names: list[str] | None  # None: regression (one output)
    metrics: list[str]
    text_columns: tuple[str, ...]
    label_column: str

    def to_dict(self) -> dict:
        """The run_config.json record (the path is where it lies, not part of it)."""
        return dict(config=self.config.to_dict(), model_path=self.model_path, num_labels=self.num_labels,
                    label_names=self.label_names, metrics=list(self.metrics), text_columns=list(self.text_columns),
                    label_column=self.label_column)


def write_run_config(run: Run, task_name: str, joint_run: Path | None = None) -> None:
    """run_config.json in the run's directory: the options, with the data files and the model as absolute paths;
    for a task of a joint run (`--task-files`), that run's directory too."""
    extra = {} if joint_run is None else dict(joint_run=str(joint_run))
    write_json(run.path / RUN_CONFIG_NAME, dict(run.to_dict(), task=task_name, **extra))


def load_run(path: str) -> Run:
    """A finished (or at least one epoch into) `bitfit-fast train` run; `UserError` for anything else."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{path} is not a directory: {NOT_A_RUN_HINT}")
    file = directory / RUN_CONFIG_NAME
    if not file.is_file():
        # A joint run's --output-dir (one run per task), a sweep's (one per learning rate), or a folder of runs.
        runs = sorted(str(d) for d in directory.iterdir() if (d / RUN_CONFIG_NAME).is_file())
        kind = ("an --lr-sweep has one run per learning rate" if (directory / SWEEP_SUMMARY_NAME).is_file() else
                "a joint run of several --task-files has one run per task")
        hint = (f"it holds the runs {', '.join(runs[:4])}{', ...' if len(runs) > 4 else ''}: pass one of them "
                f"({kind})") if runs else NOT_A_RUN_HINT
        raise UserError(f"{path} is not a `bitfit-fast train` run (it has no {RUN_CONFIG_NAME}): {hint}")
    try:
        record = json.loads(file.read_text())
        config = TrainConfig.from_dict(record["config"])
        num_labels = record["num_labels"]
        label_names = record["label_names"] or (None if num_labels == 1 else [str(i) for i in range(num_labels)])
        run = Run(directory, config, record["model_path"], num_labels, label_names, record["metrics"],
                  tuple(record.get("text_columns", config.text_columns)),
                  record.get("label_column", config.label_column))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{file} could not be read ({first_line(error)}): it is damaged or was written by another "
                        "version of bitfit-fast; train the run again") from error
    if not (directory / BEST_BIASES).is_dir():
        if not config.saves_biases:
            trains = "every weight" if config.method == "full" else "its head alone"
            reason = f"--method {config.method} trains {trains}, and only the BitFit methods save what they train"
        elif any((directory / name).exists() for name in (SUMMARY_NAME, LAST_BIASES)):  # it trained: not resumable
            reason = (f"the run trained (it has {SUMMARY_NAME if (directory / SUMMARY_NAME).exists() else LAST_BIASES}"
                      f"), but its {BEST_BIASES}/ was deleted or moved since: put it back, or train the run again in "
                      "another --output-dir")
        elif "joint_run" in record:  # a joint run keeps no checkpoint to continue from
            reason = (f"the joint run {record['joint_run']} stopped before its first epoch finished: train it again "
                      "(its --task-files command)")
        else:
            reason = (f"no epoch has finished yet: continue the run with the options it started with (its "
                      f"{RUN_CONFIG_NAME}) and `--resume`" if (directory / CHECKPOINT_NAME).is_file() else
                      "no epoch has finished and no checkpoint was saved: train it again (the same command)")
        raise UserError(f"{path} has no {BEST_BIASES}/: {reason}")
    return run


def rng_state() -> dict:
    """This process's random generators: Python's, torch's CPU one and, with a GPU, CUDA's."""
    state = dict(python=random.getstate(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclasses.dataclass
class Progress:
    """What a run has done besides its parameters and position, kept in its checkpoint for a resume."""

    data: dict  # {split: [examples, sha256 of their token ids and labels]} (data.fingerprint): a resume checks it
    seconds: float  # the run's time so far: the main process's, over every command that trained it
    # This process's:
    micro_batch_size: int  # a resume that names none splits so again: dropout's masks follow the micro-batches
    tokens: dict  # token counts so far (summary.TokenCounts' fields)


def save_checkpoint(path: Path, model, optimizer, scaler, position: dict, history: list, d: Dist,
                    progress: Progress) -> None:
    """Everything that continues the run exactly: trainable parameters, optimizer and scaler state, the data
    ``position`` (epoch, batch, step), the ``history`` so far, every process's RNG state and ``progress``; and a
    sample of the frozen weights (``checkpoint.base_sample``), by which a resume knows its base model. Collective:
    every process calls it, the main one writes."""
    own = dict(micro_batch_size=progress.micro_batch_size, tokens=progress.tokens)
    ranks = gather((rng_state(), own), d)  # every rank's, restored rank by rank on resume
    if d.main:
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = dict(trainable=trainable, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                     position=position, history=history, rng=[rng for rng, _ in ranks], world=d.world,
                     progress=dict(data=progress.data, seconds=progress.seconds, ranks=[own for _, own in ranks]),
                     base_sample=base_sample(model, trainable))
        atomic_write(path, lambda tmp: _save(state, tmp))
    barrier(d)


def _save(state: dict, path: Path) -> None:
    """torch.save through a Python file, whose writes raise a full disk's OSError (ENOSPC); torch's zip writer then
    fails as it closes, with a RuntimeError that does not say so ("unexpected pos ..."): the OSError is raised."""
    try:
        with open(path, "wb") as file:
            torch.save(state, file)
    except RuntimeError as error:
        if isinstance(error.__context__, OSError):
            raise error.__context__ from error
        raise


def _read_state(path: Path, mmap: bool = False) -> dict:
    """The checkpoint's state; ``mmap``: its tensors mapped, not read (nor checked)."""
    try:
        damaged = None if mmap else _failing_checksum(path)
        if damaged is not None:  # torch.load reads a changed byte as it is: a resume would train on from it
            raise ValueError(f"its part {damaged} fails its checksum")
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except PermissionError:  # whole, but not this user's to read: the CLI says so, the run is not to be given up
        raise
    except Exception as error:  # torch.load raises many types for a truncated or foreign file
        raise UserError(f"{path} could not be read ({first_line(error)}): it is damaged or was not written "
                        "by bitfit-fast train; start a new run in another --output-dir") from error


def _failing_checksum(path: Path) -> str | None:
    """The first part of a torch.save archive whose CRC-32 does not match its bytes, or None (also for a file
    that is no zip archive: torch.load says what it is)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except zipfile.BadZipFile:
        return None


def finished_summary(out: Path, epochs: int) -> dict | None:
    """The run_summary.json in ``out`` if it covers ``epochs`` epochs or more; None where there is none, a damaged
    one, or one written before the run trained further."""
    try:
        summary = json.loads((out / SUMMARY_NAME).read_text())
        return summary if summary["epochs"][-1]["epoch"] >= epochs else None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def check_unfinished(path: Path, epochs: int, world: int) -> None:
    """Before anything loads: a run resumed with no epoch left to train and its summary written, with fewer
    epochs than it is into, or by another number of processes than wrote its checkpoint (each process's
    generators are in it), is refused (its tensors are only mapped, not read). A run stopped after its last
    epoch's checkpoint, before its summary, finishes."""
    state = _read_state(path, mmap=True)
    _check_world(path, state, world)
    done, into_next = state["position"]["epoch"], state["position"]["batch"]
    if into_next and done >= epochs:
        raise UserError(f"{path.parent} is into epoch {done + 1} already (its checkpoint's): pass --epochs "
                        f"{done + 1} or more to continue it")
    if done > epochs or done == epochs and finished_summary(path.parent, done) is not None:
        raise UserError(f"{path.parent} has finished its {done} epochs, so there is nothing to continue: pass "
                        f"--epochs more than {done} to train it further")


def _check_world(path: Path, state: dict, world: int) -> None:
    if state["world"] != world:
        raise UserError(f"{path} was written by {state['world']} process(es), not {world}: resume it with "
                        f"{state['world']}")


def load_checkpoint(path: Path, model, optimizer, scaler, d: Dist, data: dict) -> tuple[dict, list, Progress | None]:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``optimizer``, ``scaler`` and this process's
    generators, once its data is found to be ``data`` (the run's :class:`Progress`; a checkpoint written before it
    was kept is not checked); returns (position, history, this process's progress or None)."""
    state = _read_state(path)
    _check_world(path, state, d.world)
    weight = other_base_weight(model, read_base_sample(state))  # none sampled by an earlier bitfit-fast
    if weight is not None:  # the frozen weights the biases work through: a run trained on others means nothing
        raise UserError(f"--resume: {path.parent} trained on another base model than this --model: its {weight} "
                        "holds other values; resume with the run's own base model, or start a new run in another "
                        "--output-dir")
    progress = state.get("progress")
    if progress is not None:
        progress = Progress(progress["data"], progress["seconds"], **progress["ranks"][d.rank])
        _check_same_data(path.parent, progress.data, data)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][d.rank])
    return state["position"], state["history"], progress


def _check_same_data(out: Path, trained: dict, now: dict) -> None:
    """A run continues on the examples it trained and was scored on: its data position and best epoch mean
    nothing on others."""
    for split, (examples, digest) in now.items():
        then = trained.get(split)
        if then is not None and then != [examples, digest]:
            detail = (f"{examples} examples now, {then[0]} then" if examples != then[0]
                      else f"the same {examples} examples, but other texts, labels, order or tokenization")
            raise UserError(f"--resume: the {split} data is not what {out} trained on ({detail}): give the run's data "
                            "as it was, or start a new run in another --output-dir")
