"""save_biases / load_biases: the few KB a BitFit run trains, as safetensors plus a JSON config."""

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Collection
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError

from .config import AppliedState, BitFitConfig, dtype_name, floating_dtype
from .errors import first_line
from .files import atomic_write_together, is_temporary, json_text
from .model import (
    apply,
    config_of,
    is_applied,
    is_within,
    own_config,
    planned_parameters,
    state_of,
    task_table_layers,
    trained_parameters,
    unwrapped,
    weights_drawn_at_random,
)

WEIGHTS_NAME = "bitfit_biases.safetensors"
CONFIG_NAME = "bitfit_config.json"
RUN_CONFIG_NAME = "run_config.json"  # what marks a `bitfit-fast train` run's directory (train.run)
# 2: the options ("config", a BitFitConfig) apart from what apply() found ("applied", an AppliedState).
# 1: both mixed in one "apply" dict; still read.
FORMAT_VERSION = 2
# Biases trained on one base model are meaningless on another of the same shapes, and a path does not tell them
# apart (one model sits at different paths on different machines): a checkpoint keeps a few values of every frozen
# weight of its base, at fixed places, with their dtype (see base_sample), and loading compares them.
SAMPLED_VALUES = 4


def save_biases(model: nn.Module, save_directory: str | os.PathLike, *, into_run: bool = False) -> Path:
    """Save every parameter that trains (the biases and head apply() selected, even if frozen since, and any
    parameter unfrozen since), the model's BitFitConfig and what apply() found (head, added biases). A
    ``torch.compile``'d model saves as the model it wraps.

    Returns the directory. Existing checkpoint files there are replaced together (see ``atomic_write_together``).
    A directory inside a `bitfit-fast train` run (its biases/) is refused: what a run's training wrote, only its
    training replaces (``into_run``).
    """
    model = unwrapped(model)
    tables = task_table_layers(model)
    if tables:  # no single-task model could load every task's biases as one [T, N] bias
        raise ValueError(f"this model is a TaskBank's (its biases are task tables, {tables[0]}'s among them): save "
                         "each task with bank.save_task(name, directory)")
    trained = trained_parameters(model)
    tensors = {name: param for name, param in model.named_parameters() if name in trained}
    diverged = [name for name, param in tensors.items() if not torch.isfinite(param).all()]
    if diverged:  # saved as they are (the user's to keep), but said: every output of the model is NaN
        names = f"{', '.join(diverged[:2])}{' and more' if len(diverged) > 2 else ''}"
        warnings.warn(f"save_biases: {names} {'holds' if len(diverged) == 1 else 'hold'} NaN or infinite values "
                      "(training diverged?): the model they load into answers NaN", stacklevel=2)
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return write_checkpoint(save_directory, tensors, config_of(model), state_of(model), type(model).__name__,
                            getattr(getattr(model, "config", None), "_name_or_path", None),
                            [str(id2label[i]) for i in sorted(id2label)], into_run=into_run,
                            base_sample=base_sample(model, tensors))


def base_sample(model: nn.Module, saved: Collection[str]) -> dict[str, dict]:
    """{name: {"dtype", "values": SAMPLED_VALUES values evenly spaced through it}} of every frozen floating-point
    weight of ``model`` that is not ``saved`` (a trained parameter, by name): the base model the biases work
    through, a head that does not train included."""
    return {name: {"dtype": dtype_name(param.dtype), "values": _sampled(param).tolist()}
            for name, param in model.named_parameters()
            if not param.requires_grad and param.is_floating_point() and param.numel() and name not in saved}


def _sampled(param: torch.Tensor) -> torch.Tensor:
    """SAMPLED_VALUES values evenly spaced through ``param``, as float64 on the CPU. The places are fp32's on the CPU
    on every device, as every checkpoint saved so far has them, clamped to the last element: fp32 rounds past it in
    a tensor of more than 2**24 elements (BERT-base's word embeddings), where CUDA's linspace rounds otherwise too."""
    flat = param.detach().reshape(-1)
    places = torch.linspace(0, flat.numel() - 1, SAMPLED_VALUES).round().long().clamp_(max=flat.numel() - 1)
    return flat[places.to(flat.device)].to("cpu", torch.float64)


def named_classes(label_names: list[str] | None) -> list[str] | None:
    """``label_names`` where they name the classes; None for none or Hugging Face's placeholders LABEL_0, ...
    Classes named 0, 1, ... by their data keep those names: a run's `predict` answers "1", so must its export."""
    if not label_names or list(label_names) == [f"LABEL_{i}" for i in range(len(label_names))]:
        return None
    return list(label_names)


def read_base_sample(record: dict) -> dict[str, tuple[torch.dtype, torch.Tensor]]:
    """The frozen weights' sampled values of a saved record (:func:`base_sample` under "base_sample"; none in
    earlier versions' records): {name: (dtype, values in float64)}."""
    return {name: (floating_dtype(entry["dtype"]), torch.tensor(entry["values"], dtype=torch.float64))
            for name, entry in record.get("base_sample", {}).items()}


def write_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: BitFitConfig,
                     state: AppliedState, model_class: str, base_model: str | None,
                     label_names: list[str] | None = None, into_run: bool = False,
                     base_sample: dict[str, dict] | None = None) -> Path:
    """The files of :func:`save_biases` for ``tensors`` (trained parameters by name), written atomically; the
    class names (``label_names``) where they are more than placeholders, and the base model's sampled weights
    (``base_sample``). A directory inside a `bitfit-fast train` run is refused but ``into_run`` (the run's own
    training saving its biases)."""
    from . import __version__

    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    if not str(directory).strip():  # Path("") is the current directory
        raise ValueError("the directory to save into is an empty name: name one (a new directory is made)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file: save the biases into a directory (a new one is made)")
    if (directory / RUN_CONFIG_NAME).is_file():  # TaskBank, eval and serve would read the run's biases/ instead
        raise ValueError(f"{directory} is a `bitfit-fast train` run ({RUN_CONFIG_NAME}); save the biases into "
                         f"another directory (the run's own are in {directory / 'biases'})")
    run = directory.resolve().parent  # resolved: through a link to a run's biases/ too
    if not into_run and (run / RUN_CONFIG_NAME).is_file():  # its biases/ would no longer be the run's
        raise ValueError(f"{directory} is inside the `bitfit-fast train` run {run}, whose files only its training "
                         "writes: save the biases into a directory outside the run")
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "format_version": FORMAT_VERSION,
        "bitfit_fast_version": __version__,
        "model_class": model_class,
        "base_model": base_model,
        "config": config.to_dict(),
        "applied": state.to_dict(),
        "parameters": {name: list(t.shape) for name, t in tensors.items()},
    }
    if named_classes(label_names):
        record["label_names"] = named_classes(label_names)
    if base_sample:
        record["base_sample"] = base_sample
    weights = safetensors.torch.save(tensors, metadata={"format": "pt"})
    record["weights_sha256"] = hashlib.sha256(weights).hexdigest()  # the pair's tie: see read_checkpoint
    try:
        atomic_write_together({directory / WEIGHTS_NAME: weights, directory / CONFIG_NAME: json_text(record).encode()})
    except BaseException:
        if made:  # a first save that failed (a full disk) leaves no empty directory, which would pass for a save
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return directory


def require_storage(model: nn.Module) -> None:
    """Raise if ``model`` has parameters on the meta device: copying saved values into them keeps nothing."""
    without_storage = [name for name, p in model.named_parameters() if p.is_meta]
    if without_storage:
        raise ValueError(
            f"the model's parameters are on the meta device, with no values to load into ({without_storage[0]}, "
            f"{len(without_storage)} in all): load the base weights first (e.g. from_pretrained), then the biases"
        )


def load_biases(
    model: nn.Module, load_directory: str | os.PathLike, backend: str = "auto", strict: bool = True
) -> nn.Module:
    """Load biases saved by :func:`save_biases` into ``model`` in place; returns it.

    A model that is not applied yet is first set up with the saved BitFitConfig (on ``backend``, the one choice
    that belongs to the machine rather than to the checkpoint); a weight the saved model had unfrozen trains again.
    Every name and shape is checked before the model changes, so a mismatch leaves it untouched. With ``strict``,
    the model must be of the saved class, must hold the frozen weights of the base model the biases were trained on
    (sampled at saving: a few values of each), must not train parameters that the checkpoint lacks and, if it is
    applied already, must train every parameter the checkpoint holds (else those values would be missing from its
    next save). Without, another base model's weights only warn.
    """
    given, model = model, unwrapped(model)
    checkpoint = read_checkpoint(load_directory)
    saved_config, saved_state, tensors = checkpoint.config, checkpoint.state, checkpoint.tensors
    saved_class = checkpoint.model_class
    if strict and saved_class != type(model).__name__:
        raise ValueError(
            f"the checkpoint was saved from a {saved_class}, not a {type(model).__name__}; load it into the same "
            "architecture (or pass strict=False if the names are known to match)"
        )
    require_storage(model)
    applied = is_applied(model)
    if applied:
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        trained = trained_parameters(model)
    else:  # what apply() would leave, checked before it runs
        shapes, trained = planned_parameters(model, dataclasses.replace(saved_config, backend=backend))

    unknown = sorted(set(tensors) - set(shapes))
    if unknown:
        added = {f"{name}.bias" for name in saved_state.added_biases}
        remedy = (
            "they are biases apply() added to a bias-free model: apply(model, add_missing_biases=True) first"
            if set(unknown) <= added else f"it was saved from a {saved_class}"
        )
        raise ValueError(
            f"the checkpoint holds parameters this {type(model).__name__} lacks: {unknown[:5]} "
            f"({len(unknown)} in all); {remedy}"
        )
    mismatched = [name for name, t in tensors.items() if tuple(t.shape) != shapes[name]]
    if mismatched:
        remedy = (f"the head differs: build the base model with the checkpoint's number of labels, "
                  f"{tensors[mismatched[0]].shape[0]}" if all(is_within(n, saved_state.head) for n in mismatched)
                  else f"load it onto the base model it was trained from{checkpoint.trained_from}")
        shown = [f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {shapes[name]}" for name in mismatched[:5]]
        raise ValueError(f"shape mismatch between the checkpoint and the model: {shown}; {remedy}")
    not_trained = sorted(set(tensors) - trained)  # not applied: weights the saved model had unfrozen
    if strict:
        remedy = (f"it was saved from another base model: load it onto the one it was trained from"
                  f"{checkpoint.trained_from} (strict=False loads only what it holds)" if not applied else
                  f"the checkpoint was saved with {saved_config}, the model applied with {config_of(model)}: load it "
                  "onto a base model that is not applied, or pass strict=False")
        not_in_checkpoint = sorted(trained - set(tensors))
        if not_in_checkpoint:
            raise ValueError(f"the model trains parameters that the checkpoint lacks: {not_in_checkpoint[:5]} "
                             f"({len(not_in_checkpoint)} in all); {remedy}")
        if applied and not_trained:  # loaded into frozen parameters, they would be missing from the next save
            raise ValueError(f"the checkpoint holds trained values of parameters the model does not train: "
                             f"{not_trained[:5]} ({len(not_trained)} in all); {remedy}")
    differs = checkpoint.other_base_weight(model)  # after the checks of names and shapes, which say more
    if differs and strict:
        raise OtherBaseModelError(checkpoint, differs, (
            "it is not in the checkpoint this model was loaded from (from_pretrained draws it at random, other "
            "values on every load), so these biases cannot be restored: train it with the head (head=[...]) and save "
            "again" if differs in weights_drawn_at_random(model) else
            "load them onto the base model they were trained on (strict=False loads them anyway, with a warning)"))
    if differs:
        warnings.warn(str(OtherBaseModelError(checkpoint, differs, "loaded anyway, as strict=False asks")),
                      stacklevel=2)
    if not applied:
        apply(model, saved_config, announce=False, backend=backend)
    params = dict(model.named_parameters())
    _warn_if_rounded(tensors, params)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    if not applied:
        for name in not_trained:
            params[name].requires_grad_(True)
    _name_classes(model, checkpoint)
    return given


def _warn_if_rounded(tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    """Warns where saved values do not survive the model's parameters' dtype (fp32 biases onto a base cast to bf16):
    the model, and what it saves next, keep them rounded."""
    rounded = [name for name, t in tensors.items()  # NaN is itself: a diverged bias is not a rounded one
               if not torch.allclose(t.to(params[name].dtype).to(t.dtype), t, rtol=0, atol=0, equal_nan=True)]
    if rounded:
        dtype = dtype_name(params[rounded[0]].dtype)
        more = f" and {len(rounded) - 2} more" if len(rounded) > 2 else ""
        warnings.warn(
            f"load_biases: the model's {dtype} parameters round the saved values of {', '.join(rounded[:2])}{more}; "
            "it keeps them rounded, and its next save writes them so. To keep them exact, "
            f"load onto the base model in float32 (apply(model, dtype=torch.{dtype}) runs its frozen weights in "
            f"{dtype} with float32 biases)", stacklevel=3)


def _name_classes(model: nn.Module, checkpoint: "Checkpoint") -> None:
    """A loaded head brings its classes' names (placeholders LABEL_0, ... where it was saved without any), on a
    config of the model's own (see ``own_config``)."""
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if not classes or not any(is_within(name, checkpoint.state.head) for name in checkpoint.tensors):
        return
    names = checkpoint.label_names or [f"LABEL_{i}" for i in range(classes)]
    if len(names) == classes and [model.config.id2label.get(i) for i in range(classes)] != names:
        config = own_config(model)
        config.id2label = dict(enumerate(names))
        config.label2id = {name: index for index, name in enumerate(names)}


@dataclasses.dataclass
class Checkpoint:
    """A directory written by :func:`save_biases`, read."""

    directory: Path
    config: BitFitConfig
    state: AppliedState
    model_class: str | None
    base_model: str | None
    tensors: dict[str, torch.Tensor]
    label_names: list[str] | None  # the head's class names, where saved
    base_sample: dict[str, tuple[torch.dtype, torch.Tensor]]  # see base_sample; empty in earlier versions' checkpoints

    @property
    def trained_from(self) -> str:
        """" (<base model's name or path>)" to follow "the base model it was trained on", or "" where none was
        saved (a model built from a config)."""
        return f" ({self.base_model})" if self.base_model else ""

    def other_base_weight(self, model: nn.Module, sampled: dict[str, torch.Tensor] | None = None) -> str | None:
        """:func:`other_base_weight` of these biases' base model."""
        return other_base_weight(model, self.base_sample, sampled)


def other_base_weight(model: nn.Module, sample: dict[str, tuple[torch.dtype, torch.Tensor]],
                      sampled: dict[str, torch.Tensor] | None = None) -> str | None:
    """A frozen weight of ``model`` whose values differ from those ``sample`` (:func:`read_base_sample`) kept of
    the base model trained on, or None where there is none (as far as the sample tells). Either side may be a copy
    rounded to its dtype (``apply(dtype=...)``, a base loaded in bf16): values within a rounding of the coarser
    dtype match; a base retrained by as little as one fp32 optimizer step does not. ``sampled`` keeps the model's
    values by name, for checking several samples against one model."""
    params = dict(unwrapped(model).named_parameters())
    sampled = {} if sampled is None else sampled
    for name, (dtype, saved) in sample.items():
        param = params.get(name)
        if param is None or param.is_meta or not param.numel():  # another architecture, refused elsewhere
            continue
        if name not in sampled:
            sampled[name] = _sampled(param)
        found = sampled[name]
        formats = [torch.finfo(dtype), torch.finfo(param.dtype)]
        relative, absolute = max(f.eps for f in formats), max(f.tiny for f in formats)  # tiny: flushed to 0
        if ((found - saved).abs() > relative * torch.maximum(found.abs(), saved.abs()) + absolute).any():
            return name
    return None


class OtherBaseModelError(ValueError):
    """Biases loaded onto a model whose frozen ``weight`` differs from the base model's they were trained on (in
    a TaskBank, ``task``'s)."""

    def __init__(self, checkpoint: Checkpoint, weight: str, remedy: str, task: str | None = None):
        super().__init__(f"{'' if task is None else f'task {task!r}: '}the biases in {checkpoint.directory} were "
                         f"trained on another base model{checkpoint.trained_from}: this model's {weight} holds other "
                         f"values; {remedy}")
        self.weight, self.task = weight, task


class DamagedCheckpointError(ValueError):
    """Files of :func:`save_biases` that cannot be read, or that two saves left; ``problem`` says which."""

    def __init__(self, directory: Path, problem: str):
        super().__init__(f"the checkpoint in {directory} is damaged{problem}: save the biases again")
        self.problem = problem


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read what :func:`save_biases` wrote in ``directory``; FileNotFoundError where it wrote nothing."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        run = (directory / RUN_CONFIG_NAME).is_file()  # a `bitfit-fast train` run: its best biases are in biases/
        raise FileNotFoundError(
            f"no bitfit_fast checkpoint in {directory}: expected {CONFIG_NAME} and {WEIGHTS_NAME} written by "
            "bitfit_fast.save_biases" + (f"; it is a `bitfit-fast train` run, whose best biases are in "
                                         f"{directory / 'biases'}" if run else "")
        )
    try:
        record = json.loads(config_path.read_text())
        weights = weights_path.read_bytes()
        tensors = safetensors.torch.load(weights)
        config, state = read_config(record, config_path)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        raise DamagedCheckpointError(directory, f" ({type(error).__name__}: {first_line(error)})") from error
    try:
        base = read_base_sample(record)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # ValueError: torch.tensor of strings
        raise DamagedCheckpointError(directory, f" (its base_sample: {first_line(error)})") from error
    recorded = record.get("weights_sha256")  # absent in checkpoints of earlier versions
    if recorded is not None and recorded != hashlib.sha256(weights).hexdigest():
        left = sorted(path.name for path in directory.iterdir() if is_temporary(path.name))
        kept = f"; {', '.join(left)}, left by that save, hold the other file of each pair" if left else ""
        raise DamagedCheckpointError(directory, f": its {WEIGHTS_NAME} is not the one its {CONFIG_NAME} was saved "
                                                f"with (a save interrupted between the two?{kept})")
    return Checkpoint(directory, config, state, record.get("model_class"), record.get("base_model"), tensors,
                      record.get("label_names"), base)


def read_config(record: dict, path: Path) -> tuple[BitFitConfig, AppliedState]:
    """The BitFitConfig and AppliedState of a saved ``bitfit_config.json`` record, of any format version."""
    version = record.get("format_version")
    if version == FORMAT_VERSION:
        return BitFitConfig.from_dict(record["config"]), AppliedState(**record["applied"])
    if version == 1:  # one "apply" dict: the options, with the head as found, and what apply() changed
        saved = dict(record["apply"])
        state = AppliedState(head=saved["head"], added_biases=saved.pop("added_biases"),
                             weight_dtypes=saved.pop("weight_dtypes", {}))
        return BitFitConfig.from_dict(saved), state
    if not isinstance(version, int):
        raise KeyError(f"{path} has no format version")
    raise ValueError(
        f"{path} has format version {version}; this bitfit_fast reads versions 1 and {FORMAT_VERSION}: upgrade it"
    )
