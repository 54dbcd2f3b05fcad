"""TaskBank: many BitFit tasks on one frozen base model, mixed in one batch.

A BitFit task is its biases and its head. The bank applies the base model once, turns each trained bias into a
table [T, N] (row t: task t's bias) and gives each task its own head, of any number of labels. A forward takes each
example's task: every BitFit op adds to each row its own task's bias (see ``task_rows``; the Triton kernels gather
it in their epilogue) and each example goes through its task's head. The frozen GEMMs run once for the whole batch,
so a batch of 64 tasks costs about what a batch of one task does, where per-task sub-batches (PEFT's
``adapter_names``) run 64 small batches.

Training: the tables and heads are ordinary parameters. A table's gradient holds in row t the sum over task t's
rows only (``torch_ops.task_sums``, or the kernels' bias-gradient passes: deterministic), so with
:meth:`TaskBank.loss` (the sum of each task's mean loss) and :meth:`TaskBank.optimizer` (AdamW that steps only the
batch's tasks) one optimizer step on a mixed batch is each task's own step on its examples.
:meth:`TaskBank.save_task` writes a task back as the ``save_biases`` checkpoint it came from.
"""

import copy
import dataclasses
import itertools
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import graphs, task_positions, task_rows
from .checkpoint import (
    RUN_CONFIG_NAME,
    Checkpoint,
    DamagedCheckpointError,
    OtherBaseModelError,
    base_sample,
    read_checkpoint,
    require_storage,
    write_checkpoint,
)
from .config import BitFitConfig
from .errors import check_max_norm
from .families import is_fusable_encoder_class
from .model import (
    apply,
    config_of,
    config_with,
    is_applied,
    is_within,
    planned_bias_owners,
    planned_head,
    planned_parameters,
    state_of,
)
from .torch_ops import wide


@dataclasses.dataclass
class Task:
    """One task of a bank: its name, its row in the tables, its head's width and what it predicts."""

    name: str
    index: int
    num_labels: int  # 1: regression (a score)
    label_names: list[str] | None  # class names; None: regression


class TaskHeads(nn.Module):
    """Stands in for a head module of the model: example i goes through the head of its task (``task_rows``).
    Outputs are padded with zeros to the widest task's width; TaskBank reads each example's own columns.

    Linear heads with a bias (BERT's classifier) are held concatenated, as ``weight`` [sum of widths, d] and ``bias``
    [sum of widths] (task t's rows: ``rows_per_task[t]`` of them, after those of the tasks before it), and run as one
    GEMM (see _linear_heads): two parameters however many tasks, so a step's backward, clipping and optimizer touch
    two tensors where 64 heads were 128. Other heads stay modules of their own (``heads``), a sub-batch each."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        linear = all(type(head) is nn.Linear and head.bias is not None for head in heads)
        # Made here, once: built in a forward, they would be copies from the host that wait for the GPU.
        widths = torch.tensor([head.out_features for head in heads]) if linear else None
        self.register_buffer("widths", widths, persistent=False)
        self.register_buffer("first_column", None if widths is None else widths.cumsum(0) - widths, persistent=False)
        if linear:
            self.heads = None
            self.rows_per_task = tuple(widths.tolist())
            self.weight, self.bias = (nn.Parameter(torch.cat([getattr(head, name).detach() for head in heads]),
                                                   requires_grad=getattr(heads[0], name).requires_grad)
                                      for name in ("weight", "bias"))
        else:
            self.heads = nn.ModuleList(heads)
            self.rows_per_task = None

    def width(self, task: int) -> int:
        """Task ``task``'s number of outputs."""
        return self.rows_per_task[task] if self.heads is None else _output_width(self.heads[task])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tasks = task_rows.required("head").to(x.device)
        task_rows.check_batch_size(tasks, x.shape[0])
        if self.heads is None:
            if args or kwargs:
                raise TypeError(f"a TaskBank's linear heads take the hidden states alone, got more arguments: "
                                f"{[*map(type, args), *kwargs]}")
            return self._linear_heads(x, tasks)
        parts = []
        for task in tasks.unique().tolist():
            examples = (tasks == task).nonzero().squeeze(1)
            parts.append((examples, self.heads[task](x.index_select(0, examples), *args, **kwargs)))
        width = max(out.shape[-1] for _, out in parts)
        first = parts[0][1]
        output = first.new_zeros(x.shape[0], *first.shape[1:-1], width)
        for examples, out in parts:
            output = output.index_copy(0, examples, F.pad(out, (0, width - out.shape[-1])))
        return output

    def _linear_heads(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Linear heads in a few ops, however many tasks: every head's outputs for every example from one GEMM
        with the concatenated heads, then each example's own columns gathered (a slot past its task's width reads
        its first column and is zeroed). Another task's columns never reach an example's logits, and each gradient
        element gets one value plus exact zeros, so the gather's backward is deterministic even where it adds with
        atomics (CUDA)."""
        out = F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))  # [B, ..., sum of widths]
        slot = torch.arange(max(self.rows_per_task), device=x.device)
        inside = slot < self.widths[tasks, None]  # [B, widest]
        column = self.first_column[tasks, None] + torch.where(inside, slot, 0)
        rows = out.reshape(x.shape[0], -1, out.shape[-1])
        picked = rows.gather(2, column[:, None, :].expand(-1, rows.shape[1], -1))
        return picked.masked_fill(~inside[:, None, :], 0).view(*x.shape[:-1], slot.numel())


def _resolve(source: str | os.PathLike) -> tuple[Path, list[str] | None, int | None]:
    """(save_biases directory, class names, number of labels) of a bias directory or a `bitfit-fast train` run
    (whose best biases are in its biases/, with the run's label names)."""
    path = Path(source)
    if (path / RUN_CONFIG_NAME).is_file():
        from .train import BEST_BIASES, load_run

        run = load_run(str(path))
        return path / BEST_BIASES, run.label_names, run.num_labels
    return path, None, None


def _read_task(name: str, directory: Path, of_run: bool) -> Checkpoint:
    """A task's checkpoint; a run's that is damaged says the one fix there is (only its training writes it)."""
    try:
        return read_checkpoint(directory)
    except DamagedCheckpointError as error:
        if not of_run:
            raise
        raise ValueError(f"task {name!r}: {directory} is damaged{error.problem}: train the run again") from error


def _to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor (task indices) on ``device`` without waiting for the GPU: torch's plain copy from
    pageable memory synchronises the stream (it waits for every kernel queued before it, here a whole forward or
    backward); from pinned memory the copy is queued like a kernel."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _refuse_host_copy_while_capturing(why: str) -> None:
    """A copy from the host made while a CUDA graph captures is made again at every replay, from host memory freed
    long before: what such a copy holds must be on the device before the capture (made by the warmup steps)."""
    if graphs.capturing():
        raise RuntimeError(f"{why}: a copy from the host made while a CUDA graph captures would be read again, from "
                           "freed memory, at every replay. GraphedStep gives the tasks as indices on the device; "
                           "the captured step must give the same parameters a gradient as its warmup steps")


def _head_copy(head: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of a head module holding one task's trained tensors (a head of another width is resized)."""
    copied = copy.deepcopy(head)
    for name, _ in list(copied.named_parameters()):
        _set_attribute(copied, name, nn.Parameter(tensors[f"{prefix}.{name}"].clone()))
    for module in copied.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
    return copied


def _new_head(model: nn.Module, head: nn.Module, width: int) -> nn.Module:
    """A copy of a head module whose last linear layer is new, with ``width`` outputs, initialised by the model's
    own ``_init_weights`` (a Hugging Face model's) or torch's default."""
    copied = copy.deepcopy(head)
    name, last = [(n, m) for n, m in copied.named_modules() if isinstance(m, nn.Linear)][-1]
    new = nn.Linear(last.in_features, width, bias=last.bias is not None, device=last.weight.device,
                    dtype=last.weight.dtype)
    if hasattr(model, "_init_weights"):
        model._init_weights(new)
    if not name:
        return new
    _set_attribute(copied, name, new)
    return copied


def _output_head(model: nn.Module, trained_heads: list[str]) -> str | None:
    """Which trained head module outputs the labels: the one with a linear layer of the model's ``num_labels``
    outputs (ModernBERT's "head" is a hidden-size projection before its "classifier"); None without a trained head."""
    if not trained_heads:
        return None
    num_labels = model.config.num_labels
    found = [name for name in trained_heads if any(isinstance(m, nn.Linear) and m.out_features == num_labels
                                                   for m in model.get_submodule(name).modules())]
    if not found:
        raise ValueError(f"none of the head modules {trained_heads} outputs the model's {num_labels} labels (a "
                         f"linear layer of {num_labels} outputs): name the one that does among head=, or, where "
                         "there is none, run these tasks one at a time (load_biases swaps a task's biases onto one "
                         "model): a TaskBank mixes the tasks of a *ForSequenceClassification or "
                         "*ForTokenClassification")
    if len(found) > 1:
        raise ValueError(f"cannot tell which of the head modules {trained_heads} outputs the model's {num_labels} "
                         "labels; name the head modules with head= in the BitFitConfig")
    return found[0]


def _output_width(head: nn.Module) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the head {type(head).__name__} has no linear layer to read its number of labels from")
    return linears[-1].out_features


def task_part(tasks: int | tuple[int, ...] | None, task: int) -> int | slice | None:
    """Where task ``task``'s values are in a bank's parameter whose tasks are ``tasks`` (as
    :meth:`TaskBank.parameter_tasks` gives them): a table's row, concatenated heads' rows, or all of a parameter
    of its head; None where it holds none of them. ``param[task_part(...)]`` is what the task's own model holds."""
    if tasks is None:
        return task
    if isinstance(tasks, int):
        return slice(None) if tasks == task else None
    first = sum(tasks[:task])
    return slice(first, first + tasks[task])


# Options that change how a model runs, not what it trains: tasks that differ only in them share a bank.
_EXECUTION_OPTIONS = {"backend", "memory", "fuse_layers"}


def _check_mixable(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Raise unless ``apply(model, config)`` gives a model whose tasks mix in one batch: bitfit_fast's own layers
    add every bias it trains, each to inputs that hold the examples first (or sequence first: the paths of those
    layers are returned), and it answers with logits of one row block per example. Only bitfit_fast's layers add
    each row its task's bias, and they find a row's example by its place in their input: a module that adds its
    bias itself would take a task table [T, N] for its bias [N] (a shape error, or where a batch's length is T each
    position another task's bias), and a layer whose input is not per example (position embeddings) would give rows
    the wrong tasks."""
    owners = planned_bias_owners(model, config)
    outside = {name: type(module).__name__ for name, (module, is_layer) in owners.items() if not is_layer}
    if outside:
        name, owner = next(iter(outside.items()))
        raise ValueError(f"{name} is added by a {owner} in its own forward ({len(outside)} such biases), and a "
                         "TaskBank mixes tasks in bitfit_fast's linear and LayerNorm layers only: run these tasks one "
                         "at a time (load_biases swaps a task's biases onto one model), or train without those "
                         "biases (biases=[...] patterns that leave them out)")
    # The fused encoders find each row's task in their own unpadded layout (Hugging Face's own forward may lay
    # their rows out otherwise: ModernBERT's flash-attention path unpads them itself).
    fused = [name for name, module in model.named_modules()
             if config.fuse_layers and is_fusable_encoder_class(type(module).__name__)]
    positional = task_positions.positional_layers(model)  # DeBERTa's: the bank gives them each task's values
    task_positions.check_supported(model)
    sequence_first = _check_rows_per_example(model, {name: module for name, (module, _) in owners.items()
                                                     if not is_within(name, fused) and not is_within(name, positional)})
    return sorted({name.rpartition(".")[0] for name in sequence_first})


def _give_sequence_first_layers_their_layout(model: nn.Module, layers: list[str]) -> None:
    """The applied layers at ``layers`` (``_check_mixable``'s) find each row's example in their input's second
    dimension."""
    for path in layers:
        model.get_submodule(path).examples_dim = 1


def _check_rows_per_example(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Raise unless, on the model's dummy inputs (Hugging Face's: 3 examples of 5 tokens, a batch whose length
    differs from its size), every module of ``layers`` (by its bias's name) takes an input whose first dimension
    is the batch, or whose second is (sequence first: Longformer's attention projections, [S, B, d]; their names
    are returned), and the model answers with logits of one row block per example. A model without dummy inputs,
    or one that needs other inputs, is not probed (its batches are still checked: a layer input whose first
    dimension differs from the batch size is refused)."""
    batch = getattr(model, "dummy_inputs", None)
    if not isinstance(batch, dict) or not batch:
        return []
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items() if value is not None}  # XLM's langs: None
    if "input_ids" in batch:  # without a mask, transformers warns of padding in the dummy ids (once a process)
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    examples = next(iter(batch.values())).shape[0]
    probed = _probe_layer_inputs(model, layers, batch)
    if probed is not None and any(len(shape) > 2 and shape[0] == shape[1] == examples for shape in probed[0].values()):
        # A batch as long as it is large hides which dimension holds the examples: twice the examples tell.
        examples *= 2
        probed = _probe_layer_inputs(model, layers, {key: torch.cat([value, value]) for key, value in batch.items()})
    if probed is None:  # a model that needs inputs beyond the dummy ones: not probed
        return []
    inputs, output = probed
    sequence_first = [name for name, shape in inputs.items()
                      if len(shape) > 2 and shape[0] != examples and shape[1] == examples]
    wrong = {name: shape for name, shape in inputs.items()
             if (len(shape) < 2 or shape[0] != examples) and name not in sequence_first}
    if wrong:
        name, shape = next(iter(wrong.items()))
        raise ValueError(f"{name}'s layer takes an input of shape {shape} for a batch of {examples} examples: its "
                         f"rows are neither a block per example nor sequence first ({len(wrong)} such "
                         f"layers in a {type(model).__name__}), and a TaskBank gives each row its example's "
                         "task's bias: run these tasks one at a time (load_biases swaps a task's biases onto one "
                         "model)")
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.shape[0] != examples:
        answer = f"logits of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(output).__name__
        raise ValueError(f"a {type(model).__name__} answers with {answer}, not logits per example: a TaskBank "
                         "mixes the tasks of a classification model (a *ForSequenceClassification or "
                         "*ForTokenClassification); run these tasks "
                         "one at a time (load_biases swaps a task's biases onto one model)")
    return sequence_first


def _probe_layer_inputs(model: nn.Module, layers: dict[str, nn.Module], batch: dict) -> tuple[dict, object] | None:
    """({name: the first input shape of layer ``layers[name]``}, the output) of an eval forward on ``batch``, or
    None where the forward fails. It runs a copy sharing the model's tensors, since a forward may change its model
    (Big Bird, given inputs shorter than its blocks, turns its block-sparse attention to full attention for good);
    a model that cannot be copied (a lock among its attributes, weight_norm's computed weight) runs itself, its
    modules' modes restored after."""
    inputs = {}

    def recorder(name: str):
        def record(module, args):
            if args:
                inputs.setdefault(name, tuple(args[0].shape))
        return record

    copied = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    try:
        probe = copy.deepcopy(model, copied)
    except Exception:
        probe, copied = model, {id(module): module for module in model.modules()}
    modes = {module: module.training for module in model.modules()}  # each its own: a submodule may differ
    hooks = [copied[id(module)].register_forward_pre_hook(recorder(name)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            return inputs, probe.eval()(**batch)
    except Exception:
        return None
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training


def _check_base_model(model: nn.Module, names) -> None:
    """A bank holds a Hugging Face model whose head answers logits per example, not applied yet (a bank applies
    its base model itself), and tasks named by non-empty strings (an integer is read as a task's index)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError("a TaskBank holds a Hugging Face model with a task head (a *ForSequenceClassification or "
                         f"*ForTokenClassification), which answers logits per example; got a {type(model).__name__}")
    unnamed = [name for name in names if not isinstance(name, str) or not name]
    if unnamed:
        raise ValueError(f"tasks are named by non-empty strings (bank(tasks) reads an integer as a task's index); "
                         f"got {unnamed[0]!r}")
    if type(model).__name__.endswith("ForMultipleChoice"):
        raise ValueError(f"a {type(model).__name__} runs each example's choices as examples of their own, and a "
                         "TaskBank gives each example its task: run multiple-choice tasks one at a time (load_biases "
                         "swaps a task's biases onto one model)")
    if is_applied(model):
        raise ValueError(f"this {type(model).__name__} is applied already (bitfit_fast.apply, or a TaskBank's model): "
                         "a TaskBank applies its base model itself; pass a fresh one")


def _refuse_token_scores(num_labels: Mapping[str, int]) -> None:
    """Token classification's tasks are classes: Hugging Face's token classification takes no regression score."""
    scores = [name for name, n in num_labels.items() if n == 1]
    if scores:
        raise ValueError(f"a token classification task has 2 classes or more (Hugging Face's token classification "
                         f"takes no regression score); {scores} have 1")


def _heads_train(config: BitFitConfig) -> bool:
    """Whether each task trains a head of its own: not with ``train_head=False``, nor with ``head=[]`` (no head
    module: the model's output layer is frozen with the body, its biases following ``biases``). Otherwise the tasks
    share the model's frozen head, of its number of labels."""
    return config.train_head and config.head != []


def _check_runs_labels(model: nn.Module, config: BitFitConfig, checkpoints: dict[str, Checkpoint],
                       resolved: dict[str, tuple]) -> None:
    """Before the model changes: each task loaded from a `bitfit-fast train` run holds a head of the run's number of
    labels (a run's biases/ replaced by another's would answer under the run's class names)."""
    output = None
    for name, (directory, _, run_labels) in resolved.items():
        if run_labels is None:
            continue
        checkpoint = checkpoints[name]
        if not _heads_train(config):
            width = model.config.num_labels
        else:
            output = output or _output_head(model, sorted(checkpoint.state.head))
            width = _output_width(_head_copy(model.get_submodule(output), output, checkpoint.tensors))
        if width != run_labels:
            raise ValueError(f"task {name!r}: its run was trained with {run_labels} labels, but {directory} holds a "
                             f"head of {width}: those biases are not the run's (replaced since?); train the run again")


def _named_sources(sources: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike]
                   ) -> Mapping[str, str | os.PathLike]:
    """``TaskBank.load``'s sources by task name: a list is named by its directories' names."""
    if isinstance(sources, str | os.PathLike):
        raise ValueError(f"sources are several tasks, {{name: directory}} or a list of directories; got one path, "
                         f"{str(sources)!r}: pass [{str(sources)!r}]")
    if not isinstance(sources, Mapping):
        names = [Path(source).resolve().name for source in sources]  # "." is named as its directory
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise ValueError(f"two tasks would be named {twice!r} (a list names each by its directory): pass "
                             "{name: directory} instead")
        sources = dict(zip(names, sources))
    if not sources:
        raise ValueError("a TaskBank needs at least one task")
    return sources


def _check_trained_alike(checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    """The first task's checkpoint, once every task is found trained on the same model class with the same BitFit
    options."""
    first_name, first = next(iter(checkpoints.items()))
    for name, checkpoint in checkpoints.items():
        if checkpoint.model_class != first.model_class:
            raise ValueError(f"task {name!r} ({checkpoint.directory}) was trained on a {checkpoint.model_class}, "
                             f"task {first_name!r} ({first.directory}) on a {first.model_class}: the tasks of a "
                             "bank share one base model")
        mine, theirs = _options(checkpoint), _options(first)
        differ = [f"{key} {mine[key]!r} vs {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]
        if differ:
            raise ValueError(f"task {name!r} ({checkpoint.directory}) was trained with other BitFit options than "
                             f"task {first_name!r} ({first.directory}): {'; '.join(differ)}. The tasks of a bank "
                             "share one BitFitConfig: load them in separate banks (bitfit-fast serve: separate "
                             "servers)")
    return first


def _check_trained_on(model: nn.Module, checkpoints: dict[str, Checkpoint], shapes: dict, trained: set) -> None:
    """Every task holds the parameters ``model`` trains (``planned_parameters``: their ``shapes``, the ``trained``
    names), of its sizes, and was trained on its frozen weights."""
    sampled = {}  # the model's values that the tasks' base samples are compared with
    for name, checkpoint in checkpoints.items():
        trained_from = f" ({checkpoint.base_model})" if checkpoint.base_model else ""
        if set(checkpoint.tensors) != trained:
            differ = sorted(set(checkpoint.tensors) ^ trained)
            raise ValueError(f"task {name!r} ({checkpoint.directory}) does not hold the parameters this model "
                             f"trains: {differ[:5]} differ. It was trained on a model of other sizes (another "
                             f"number of layers?): load it onto the base model it was trained from{trained_from}")
        # A head's output layer may differ in width (its first dimension) from task to task; nothing else may.
        compared = {p: slice(1 if is_within(p, checkpoint.state.head) else 0, None) for p in checkpoint.tensors}
        mismatched = [p for p, part in compared.items()
                      if tuple(checkpoint.tensors[p].shape)[part] != shapes[p][part]]
        if mismatched:
            shown = [f"{p}: {tuple(checkpoint.tensors[p].shape)} vs model {shapes[p]}" for p in mismatched[:3]]
            raise ValueError(f"task {name!r} ({checkpoint.directory}) was trained on a model of other sizes: "
                             f"{shown}; load it onto the base model it was trained from{trained_from}")
        differs = checkpoint.other_base_weight(model, sampled)
        if differs:
            raise OtherBaseModelError(checkpoint, differs, "load it onto the base model it was trained on", name)


def _options(checkpoint: Checkpoint) -> dict:
    """What must agree between the tasks of one bank: the options that decide what a task trains, the head as the
    modules it was (`bitfit-fast train` names them; apply() finds the same by default)."""
    options = {key: value for key, value in checkpoint.config.to_dict().items()
               if key not in _EXECUTION_OPTIONS | {"head"}}
    return options | {"head": sorted(checkpoint.state.head)}


class TaskBank(nn.Module):
    """T BitFit tasks on one applied base model; see the module docstring.

    ``bank(tasks, **batch)`` returns logits [B, widest task], example i's in its task's first ``num_labels``
    columns; ``tasks`` holds task names or indices, one per example.
    """

    def __init__(self, model: nn.Module, tasks: list[Task], head_names: list[str]):
        super().__init__()
        self.model = model
        self.tasks = {task.name: task for task in tasks}
        self.head_names = head_names
        self._parameter_tasks = None  # see parameter_tasks
        self._head_tasks = None  # (the heads' tasks, that list on the device): see clip_grad_norm_
        self._row_tasks_made = {}  # see _row_tasks
        # The modules Hugging Face's gradient checkpointing may set up: see task_rows.recompute_with_tasks.
        self._checkpointing = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
        # Each task's number of labels, where the loss reads it: a tensor made in each loss would be a host copy.
        device = next(model.parameters()).device
        self.register_buffer("widths", torch.tensor([task.num_labels for task in tasks], device=device),
                             persistent=False)

    def get_extra_state(self) -> dict:
        """The tasks' names in row order, in the bank's state_dict: a state of the same shapes from a bank of other
        tasks, or of these in another order, would load each task's rows into another task."""
        return {"tasks": list(self.tasks)}

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("tasks") if isinstance(state, dict) else None
        if saved != list(self.tasks):
            raise ValueError(f"this state is of a bank of the tasks {saved} (in row order), this bank's are "
                             f"{list(self.tasks)}: load it into a bank of the same tasks in the same order")

    @classmethod
    def load(cls, model: nn.Module, sources: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
             backend: str = "auto") -> "TaskBank":
        """A bank of the tasks saved in ``sources`` (``save_biases`` directories or `bitfit-fast train` runs, by
        name; a list is named by the directories' names) on ``model``, a base model not applied yet: the one the
        tasks were trained on (its class, sizes and frozen weights are checked as ``load_biases`` checks them). The
        tasks must share their BitFit options."""
        sources = _named_sources(sources)
        _check_base_model(model, sources)
        resolved = {name: _resolve(source) for name, source in sources.items()}
        checkpoints = {name: _read_task(name, directory, of_run=labels is not None)
                       for name, (directory, _, labels) in resolved.items()}
        first = _check_trained_alike(checkpoints)
        if model.__class__.__name__ != first.model_class:
            raise ValueError(f"the tasks were trained on a {first.model_class}, not a {type(model).__name__}")
        require_storage(model)
        config = dataclasses.replace(first.config, backend=backend)
        shapes, trained = planned_parameters(model, config)  # checked before apply() changes the model
        sequence_first = _check_mixable(model, config)
        _check_trained_on(model, checkpoints, shapes, trained)
        _check_runs_labels(model, config, checkpoints, resolved)
        apply(model, config, announce=False)
        _give_sequence_first_layers_their_layout(model, sequence_first)
        # Without a trained head every task answers through the model's frozen one, of the model's width.
        shared_width = 0 if _heads_train(config) else model.config.num_labels
        tasks = [Task(name, index, resolved[name][2] or shared_width, resolved[name][1] or checkpoint.label_names)
                 for index, (name, checkpoint) in enumerate(checkpoints.items())]
        saved = list(checkpoints.values())
        bank = cls._assemble(model, tasks, lambda name, t: saved[t].tensors[name],
                             lambda head_name, head, t, _: _head_copy(head, head_name, saved[t].tensors))
        return bank

    @classmethod
    def new(cls, model: nn.Module, num_labels: Mapping[str, int], config: BitFitConfig | None = None,
            **overrides) -> "TaskBank":
        """A bank of new tasks to train together ({name: number of labels, 1 for regression}) on ``model``, a base
        model not applied yet, applied here with ``config`` and ``overrides`` (as :func:`bitfit_fast.apply`).
        Every task starts from the base model's biases and a new head of its own width, initialised as the model
        initialises its heads."""
        if not isinstance(num_labels, Mapping):
            raise ValueError(f"num_labels is {{task name: number of labels}} (1: a regression score); got "
                             f"{type(num_labels).__name__}")
        if not num_labels:
            raise ValueError("a TaskBank needs at least one task")
        _check_base_model(model, num_labels)
        bad = {name: n for name, n in num_labels.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
        if bad:
            raise ValueError(f"a task's number of labels is a positive integer (1: a regression score); got {bad}")
        if type(model).__name__.endswith("ForTokenClassification"):
            _refuse_token_scores(num_labels)
        options = config_with(config, overrides)
        if _heads_train(options):
            _output_head(model, planned_head(model, options))  # raises here what the assembly would after apply
        else:
            width = model.config.num_labels
            other = {name: n for name, n in num_labels.items() if n != width}
            if other:
                raise ValueError(f"with no head trained (train_head=False or head=[]) the tasks share the model's "
                                 f"frozen head of {width} labels, but {other} differ: train the heads, or give "
                                 f"every task {width} labels")
        sequence_first = _check_mixable(model, options)
        apply(model, options, announce=False)
        _give_sequence_first_layers_their_layout(model, sequence_first)
        params = dict(model.named_parameters())
        tasks = [Task(name, index, width, None) for index, (name, width) in enumerate(num_labels.items())]
        return cls._assemble(
            model, tasks, lambda name, t: params[name].detach(),
            lambda head_name, head, t, is_output: _new_head(model, head, tasks[t].num_labels) if is_output
            else copy.deepcopy(head))

    @classmethod
    def _assemble(cls, model: nn.Module, tasks: list["Task"], bias_of, head_of) -> "TaskBank":
        """The bank of an applied ``model``: each trained bias outside the head becomes a table whose row t is
        ``bias_of(name, t)``, each trained head module a :class:`TaskHeads` of ``head_of(name, module, t,
        is_output)`` (``is_output``: the module that outputs the labels, see :func:`_output_head`)."""
        head_names = state_of(model).head if _heads_train(config_of(model)) else []
        with torch.no_grad():
            for name, param in list(model.named_parameters()):
                if param.requires_grad and not is_within(name, head_names):
                    table = torch.stack([bias_of(name, task.index) for task in tasks])
                    _set_attribute(model, name, nn.Parameter(table.to(param.device, param.dtype)))
        trained_heads = [name for name in head_names
                         if any(p.requires_grad for p in model.get_submodule(name).parameters())]
        output = _output_head(model, trained_heads)
        for head_name in trained_heads:
            head = model.get_submodule(head_name)
            device = next(head.parameters()).device
            heads = TaskHeads([head_of(head_name, head, task.index, head_name == output) for task in tasks])
            _set_attribute(model, head_name, heads.to(device))
        task_positions.install(model)
        for task in tasks:
            if output is not None:
                task.num_labels = model.get_submodule(output).width(task.index)
            if task.label_names is not None and len(task.label_names) != task.num_labels:  # not this head's
                task.label_names = None
            if task.label_names is None and task.num_labels > 1:
                task.label_names = [str(i) for i in range(task.num_labels)]
        return cls(model, tasks, head_names)

    def task_index(self, tasks: Sequence[str | int] | torch.Tensor, device: torch.device | None = None
                   ) -> torch.Tensor:
        """[B] task indices of names or indices; ValueError naming an unknown task. Indices in a tensor are read
        to be checked (on a GPU a sync), but not while a CUDA graph captures: GraphedStep checks them before."""
        if isinstance(tasks, str):  # its characters would be read as the examples' tasks
            raise ValueError(f"tasks are one per example, a list of names or indices or a tensor; got the string "
                             f"{tasks!r}: pass [{tasks!r}] * the number of examples")
        if isinstance(tasks, torch.Tensor):
            if tasks.dtype.is_floating_point or tasks.dtype.is_complex or tasks.dtype == torch.bool:
                raise ValueError(f"task indices are integers, got a {tasks.dtype} tensor")
            if tasks.dim() != 1:
                raise ValueError(f"tasks are one per example, a 1-D tensor of indices; got shape {tuple(tasks.shape)}")
            index = tasks.long()
        else:
            if not isinstance(tasks, Sequence):
                raise ValueError(f"tasks are one per example, a list of names or indices or a tensor; got {tasks!r}")
            by_index = [task.name for task in self.tasks.values()]
            index = []
            for task in tasks:
                if isinstance(task, str):
                    if task not in self.tasks:
                        raise ValueError(f"unknown task {task!r}; the bank holds {by_index}")
                    index.append(self.tasks[task].index)
                else:
                    try:
                        if isinstance(task, bool):  # an int to operator.index, as a bool tensor is no index
                            raise TypeError
                        index.append(operator.index(task))  # an integer; a float is no index
                    except TypeError:
                        raise ValueError(f"a task is a name or an integer index, got {task!r}") from None
            index = torch.tensor(index, dtype=torch.long)
            if device is not None:
                _refuse_host_copy_while_capturing("the tasks are given by name or as a list")
        if index.numel() and not graphs.capturing() and (int(index.min()) < 0 or int(index.max()) >= len(self.tasks)):
            raise ValueError(f"task indices must be in [0, {len(self.tasks)}), got {index.tolist()}")
        return _to_device(index, device) if device is not None else index

    def task_presence(self, tasks, device: torch.device) -> torch.Tensor:
        """[T] bool on ``device``: which tasks ``tasks`` (names or indices, one per example) holds, made there."""
        index = self.task_index(tasks, device)
        return torch.zeros(len(self.tasks), dtype=torch.bool, device=device).index_fill_(0, index, True)

    def forward(self, tasks, **batch) -> torch.Tensor:
        """Logits [B, widest task] of a mixed batch (example i's in its task's first num_labels columns)."""
        if "labels" in batch:  # the model's own loss would take every example as its first task's
            raise ValueError("TaskBank returns logits, not a loss: drop labels from the batch and take "
                             "bank.loss(logits, labels, tasks)")
        if not batch:
            raise ValueError("the batch is empty: pass the model's inputs, bank(tasks, input_ids=..., "
                             "attention_mask=...)")
        tensors = [value for value in batch.values() if isinstance(value, torch.Tensor)]
        if not tensors:
            raise ValueError("the batch holds no tensor: pass the model's inputs, bank(tasks, input_ids=..., "
                             "attention_mask=...)")
        index = self.task_index(tasks, tensors[0].device)
        # Checked here too, not only by the layers that add a task's bias: a bank that trains few of them (DeBERTa
        # with biases=["intermediate.dense"]) met the wrong count first in its attention, as a bmm's shape error.
        inputs = next((batch[key] for key in ("input_ids", "inputs_embeds") if batch.get(key) is not None), None)
        if inputs is not None:
            task_rows.check_batch_size(index, inputs.shape[0])
        if batch.get("output_hidden_states") or batch.get("output_attentions"):
            raise ValueError("a TaskBank returns the logits alone: for hidden states or attentions, register a "
                             "forward hook on the modules that compute them")
        task_rows.recompute_with_tasks(self._checkpointing)
        with task_rows.example_tasks(index):
            outputs = self.model(**batch)
        return outputs[0] if isinstance(outputs, tuple) else outputs.logits  # a tuple: return_dict=False

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, tasks) -> torch.Tensor:
        """The sum over the batch's tasks of each task's mean loss (:meth:`task_losses`): its gradient for task t
        is task t's own, as if trained alone."""
        return self.task_losses(logits, labels, tasks).sum()

    def task_losses(self, logits: torch.Tensor, labels: torch.Tensor, tasks) -> torch.Tensor:
        """[T] each task's mean loss over its examples in the batch (0 for a task the batch does not hold):
        cross-entropy over its own classes, mean squared error for a regression task. Token classification's logits
        [B, S, widest task] take labels [B, S], -100 for a token not scored (as Hugging Face's), and a task's loss
        is the mean over its scored tokens, as its own model's. A class outside its task's is refused where the
        logits are on the CPU (on a GPU, asking would cost a sync a step: its loss is not finite)."""
        index = self.task_index(tasks, logits.device)
        per_token = logits.dim() == 3
        shape = tuple(logits.shape[:-1])
        if not isinstance(labels, torch.Tensor) or labels.shape != shape or len(index) != logits.shape[0]:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels are a tensor of one label per {'token' if per_token else 'example'}, shape "
                             f"{shape} for these logits, with a task per example; got labels {got} and {len(index)} "
                             "tasks")
        if per_token:  # TaskBank.new refuses them; a loaded task may hold a 1-wide head
            _refuse_token_scores({task.name: task.num_labels for task in self.tasks.values()})
        widths = self.widths.to(logits.device)[index]
        logits, labels = wide(logits), labels.to(logits.device)
        if per_token:  # a row per token: each example's tokens in turn
            widths = widths.repeat_interleave(shape[1])
            logits, labels = logits.flatten(0, 1), labels.flatten()
        scored = labels != -100 if per_token else None
        # Each row's classes only: the columns past its task's width (zeros) get -inf, so no probability.
        outside = torch.arange(logits.shape[-1], device=logits.device) >= widths[:, None]
        regression = widths == 1
        if logits.device.type == "cpu" and not graphs.capturing():
            wrong = (widths > 1) & ((labels < 0) | (labels >= widths) | (labels != labels.round()))
            if per_token:
                wrong &= scored
            if wrong.any():
                i = int(wrong.nonzero()[0, 0])
                where = f"example {i // shape[1]}'s token {i % shape[1]}" if per_token else f"example {i}"
                raise ValueError(f"{where}'s label is {labels[i].item()!r}, but its task "
                                 f"{list(self.tasks)[int(index[i // shape[1] if per_token else i])]!r} has classes "
                                 f"0 to {int(widths[i]) - 1}" + (" (-100: a token not scored)" if per_token else ""))
        cross_entropy = F.cross_entropy(logits.masked_fill(outside, float("-inf")),
                                        labels.long().masked_fill(regression if scored is None else ~scored, 0),
                                        reduction="none")
        if per_token:  # where, not a product: an unscored token's inf or NaN stays out, as HF's ignore_index keeps it
            per_example = torch.where(scored, cross_entropy, 0.0).view(shape).sum(dim=1)
            counts = scored.view(shape).sum(dim=1)
        else:
            per_example = torch.where(regression, (logits[:, 0] - labels.to(logits.dtype)).square(), cross_entropy)
            counts = torch.ones_like(per_example)
        # Sums per task over a one-hot mask: deterministic, with no bincount (which on a GPU reads the largest index
        # back to size its output), and by where, not a product, so that one task's inf stays in its own loss (inf ·
        # 0 would make every task's NaN).
        of_task = F.one_hot(index, len(self.tasks)).bool()  # [B, T]
        sums = torch.where(of_task, per_example[:, None], 0.0).sum(dim=0)
        return sums / torch.where(of_task, counts[:, None], 0).sum(dim=0).clamp(min=1)

    def optimizer(self, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8
                  ) -> "TaskAdamW":
        """AdamW over the bank's trained parameters in which a task steps only when the batch holds its examples:
        ``optimizer.step(tasks)`` with the batch's tasks (see :class:`TaskAdamW`)."""
        return TaskAdamW(self, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    def parameter_tasks(self) -> dict[nn.Parameter, int | tuple[int, ...] | None]:
        """Each trained parameter's tasks: None for a table (row t: task t), the rows each task holds in turn for
        concatenated linear heads (``TaskHeads.rows_per_task``), the task's index for a parameter of one task's head
        (see :func:`task_part`). The names are read once, and again when the trained parameters change (clipping
        asks at every step)."""
        trained = [param for param in self.model.parameters() if param.requires_grad]
        known = self._parameter_tasks
        if known is not None and len(known) == len(trained) and all(a is b for a, b in zip(known, trained)):
            return dict(known)
        tasks = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if not any(is_within(name, [head]) for head in self.head_names):
                tasks[param] = None
                continue
            owner = self.model.get_submodule(name.rpartition(".")[0])
            # Otherwise a parameter of one task's head module: "<head>.heads.<task>.<...>".
            tasks[param] = (owner.rows_per_task if isinstance(owner, TaskHeads)
                            else int(name.split(".heads.", 1)[1].split(".", 1)[0]))
        self._parameter_tasks = tasks
        return dict(tasks)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Gradient clipping per task, as each task's own run clips: task t's gradients (its table rows and its
        heads) are scaled so that their norm is at most ``max_norm``. Returns the tasks' norms before clipping.

        The tables are summed and scaled as one [T, ...] matrix, concatenated heads by their rows' tasks and heads
        of their own in multi-tensor ops, deterministically (no atomics): a few operations, not a set per
        parameter. A task's inf or NaN stays in its own norm (a product with a one-hot matrix would spread it: inf *
        0 is NaN; ``where`` does not)."""
        check_max_norm("max_norm", max_norm)
        tables, concatenated, heads, head_tasks = [], {}, [], []
        for param, tasks in self.parameter_tasks().items():
            if param.grad is None:
                continue
            if tasks is None:
                tables.append(param.grad)
            elif isinstance(tasks, tuple):
                concatenated.setdefault(tasks, []).append(param.grad)
            else:
                heads.append(param.grad)
                head_tasks.append(tasks)
        grads = tables + heads + [grad for group in concatenated.values() for grad in group]
        if not grads:
            return torch.zeros(len(self.tasks))
        device = grads[0].device
        wider = any(grad.dtype == torch.float64 for grad in grads)  # a float64 bank: its norms in float64
        squares = torch.zeros(len(self.tasks), device=device, dtype=torch.float64 if wider else torch.float32)
        if tables:
            rows = torch.cat([wide(grad).reshape(grad.shape[0], -1) for grad in tables], dim=1)
            squares += rows.square().sum(dim=1)
        row_tasks = {rows_per_task: self._row_tasks(rows_per_task, device) for rows_per_task in concatenated}
        for rows_per_task, group in concatenated.items():  # a TaskHeads' weight and bias: rows of the same tasks
            row_squares = sum(wide(grad).reshape(grad.shape[0], -1).square().sum(dim=1) for grad in group)
            of_task = F.one_hot(row_tasks[rows_per_task], len(self.tasks)).bool()
            squares += torch.where(of_task, row_squares[:, None], 0.0).sum(dim=0)
        if heads:
            if self._head_tasks is None or self._head_tasks[0] != head_tasks or self._head_tasks[1].device != device:
                # Kept from step to step: a copy captured in a CUDA graph would read its host memory at every replay.
                _refuse_host_copy_while_capturing("the heads with a gradient differ from the warmup steps'")
                self._head_tasks = head_tasks, _to_device(torch.tensor(head_tasks), device)
            head_tasks = self._head_tasks[1]
            of_task = F.one_hot(head_tasks, len(self.tasks)).bool()
            head_squares = torch.stack(torch._foreach_norm([wide(grad) for grad in heads])).square()
            squares += torch.where(of_task, head_squares[:, None], 0.0).sum(dim=0)
        norms = squares.sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s formula
        if tables:
            scaled = rows.mul_(scale[:, None]).split([grad[0].numel() for grad in tables], dim=1)
            for dtype in {grad.dtype for grad in tables}:  # one dtype per copy: older torch's CUDA _foreach_copy_
                same = [(grad, part) for grad, part in zip(tables, scaled) if grad.dtype == dtype]  # mixed them up
                torch._foreach_copy_([grad for grad, _ in same], [part.view_as(grad) for grad, part in same])
        for rows_per_task, group in concatenated.items():
            row_scale = scale[row_tasks[rows_per_task]]
            for grad in group:
                grad.mul_(row_scale.view(-1, *[1] * (grad.dim() - 1)))
        if heads:
            torch._foreach_mul_(heads, list(scale[head_tasks].unbind()))
        return norms

    def _row_tasks(self, rows_per_task: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """[sum of rows] each row's task, of concatenated heads holding ``rows_per_task``; made once per device (a
        copy captured in a CUDA graph would read its host memory at every replay)."""
        key = rows_per_task, torch.device(device)
        if key not in self._row_tasks_made:
            _refuse_host_copy_while_capturing("the concatenated heads' rows were not seen by a warmup step")
            rows = torch.arange(len(rows_per_task)).repeat_interleave(torch.tensor(rows_per_task))
            self._row_tasks_made[key] = _to_device(rows, device)
        return self._row_tasks_made[key]

    def task_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Task ``name``'s trained parameters, named as in a single-task model (what save_biases saves): views of
        the bank's parameters, detached. A view with a gradient function would keep each parameter's gradient
        accumulator alive as long as it lives, bound to the stream it was made on: a GraphedStep capturing on its
        own stream then makes the default stream wait for the capture (CUDA's "operation would make the legacy
        stream depend on a capturing blocking stream")."""
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; the bank holds {list(self.tasks)}")
        index = self.tasks[name].index
        tensors = {}
        param_names = {param: param_name for param_name, param in self.model.named_parameters()}
        for param, tasks in self.parameter_tasks().items():
            part = task_part(tasks, index)
            if part is None:
                continue
            param_name = param_names[param]
            if isinstance(tasks, int):  # "<head>.heads.<task>.<name in the head>"
                param_name = param_name.replace(f".heads.{tasks}.", ".", 1)
            tensors[param_name] = param.detach()[part]
        return tensors

    def save_task(self, name: str, directory: str | os.PathLike, *, into_run: bool = False) -> Path:
        """Task ``name`` as a ``save_biases`` checkpoint: ``load_biases`` puts it on a fresh base model. Like
        ``save_biases`` it refuses a directory inside a `bitfit-fast train` run, but ``into_run`` (a joint run's
        training saving a task's biases)."""
        tensors = self.task_tensors(name)
        return write_checkpoint(directory, tensors, config_of(self.model), state_of(self.model),
                                type(self.model).__name__,
                                self.model.config._name_or_path,
                                self.tasks[name].label_names, into_run=into_run,
                                base_sample=base_sample(self.model, tensors))

    def extra_repr(self) -> str:
        return "tasks=" + ", ".join(f"{t.name} ({t.num_labels})" for t in self.tasks.values())


def _is_real(value) -> bool:
    """A real number (not a bool, a string or None): what an optimizer's hyperparameter is."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TaskAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's update, without amsgrad) for a :class:`TaskBank`, in which a task steps only when
    the batch held its examples. ``step(tasks)`` takes the batch's tasks, as the bank's forward does.

    torch's AdamW would step every task on every batch: a task absent from a batch has a zero gradient, yet its
    momentum and weight decay would move it and its step count would grow, so it would not end where its own run
    does. Here an absent task keeps its parameters, moments and step count; each task's part of a parameter (a
    table's row, its rows of concatenated heads, a head parameter of its own) counts its own steps.

    A step is a fixed number of operations, decided on the device: those parts of a param group's parameters are the
    segments of one flat vector (:class:`_FlatSegments`), each stepped where its task is in the batch. Stepped per
    parameter, a bert-mini bank of 64 tasks ran 2,050 operations a step (when each task's head was parameters of its
    own), each a kernel launch on a GPU; as segments, a fixed few. Tasks given as names or host indices are copied
    to the device from pinned memory, and nothing is read back: the host never waits for the GPU (indices already in
    a GPU tensor are read back to be checked, but not while a CUDA graph captures the step: GraphedStep checks them
    before).
    """

    def __init__(self, bank: TaskBank, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8):
        # As torch's AdamW checks them (a tensor lr, a schedule's, is read from memory at each step).
        if not isinstance(lr, torch.Tensor) and not (_is_real(lr) and lr >= 0.0):
            raise ValueError(f"lr is a learning rate, 0 or more; got {lr!r}")
        if not (_is_real(weight_decay) and weight_decay >= 0.0 and _is_real(eps) and eps >= 0.0
                and isinstance(betas, Sequence) and len(betas) == 2
                and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"AdamW takes weight_decay and eps of 0 or more and two betas in [0, 1); got "
                             f"weight_decay={weight_decay!r}, eps={eps!r}, betas={betas!r}")
        self.bank = bank
        self._task_of = bank.parameter_tasks()
        # (group, device, dtype) -> its flat state, built at its first step and again whenever the state was replaced
        # (load_state_dict): see _FlatSegments.holds
        self._flat: dict[tuple, _FlatSegments] = {}
        super().__init__(list(self._task_of), dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    def __getstate__(self) -> dict:
        # torch's Optimizer keeps its defaults, state and param groups only: a copy or a pickle would lose the bank.
        return {**super().__getstate__(), "bank": self.bank, "_task_of": self._task_of}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._flat = {}  # made again from the state at the next step

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, after a check that the state is of a bank of this bank's tasks (torch checks the number of
        parameters alone, and another bank's tables failed later, in a step)."""
        params = [param for group in self.param_groups for param in group["params"]]
        for index, state in state_dict.get("state", {}).items():
            moments = state.get("exp_avg") if isinstance(state, dict) else None
            if isinstance(moments, torch.Tensor) and 0 <= index < len(params) and moments.shape != params[index].shape:
                raise ValueError(f"this optimizer state holds a moment of shape {tuple(moments.shape)} for a "
                                 f"parameter of shape {tuple(params[index].shape)}: it is of a bank of other tasks; "
                                 "load the state this bank's optimizer saved")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, tasks) -> None:
        present_on = {}  # device -> the batch's tasks there [T]: made once per device a step
        stepped = set()  # the _flat keys of this step
        for index, group in enumerate(self.param_groups):
            parts = {}
            for param in group["params"]:
                parts.setdefault((index, param.device, param.dtype), []).append(param)
            for key, params in parts.items():
                if all(param.grad is None for param in params):
                    continue
                flat = self._flat.get(key)
                if flat is None or not flat.holds(params, self.state):
                    flat = self._flat[key] = _FlatSegments(params, [self._task_of[p] for p in params], self.state)
                stepped.add(key)
                if key[1] not in present_on:
                    present_on[key[1]] = self.bank.task_presence(tasks, key[1])
                flat.step(present_on[key[1]], **_hyperparameters(group))
        # State now elsewhere (after bank.to()) leaves its old entry: dropped, not kept alive.
        self._flat = {key: flat for key, flat in self._flat.items() if key in stepped}


def _hyperparameters(group: dict) -> dict:
    return {key: group[key] for key in ("lr", "weight_decay", "betas", "eps")}


class _FlatSegments:
    """A group's trained parameters on one device and dtype, stepped by :class:`TaskAdamW` as one flat vector of
    segments: each row of a task table [T, ...] (row t: task t's), each task's rows of concatenated heads and each
    head parameter of one task is one. The moments live in two flat buffers and the step counts, one per segment, in
    one tensor; each parameter's state holds views of them (a table's or concatenated heads' step [T], a head
    parameter's a 0-d tensor), so that ``state_dict`` keeps torch's per-parameter layout. A step gathers the
    parameters and gradients into flat vectors, updates them with each element's segment factors (spread by
    ``repeat_interleave``) and copies the parameters back: about 25 operations however many parameters there are,
    and 4 to 6 flat vectors of temporary memory (torch's foreach AdamW: ~3)."""

    def __init__(self, params: list[torch.Tensor], tasks: list[int | tuple[int, ...] | None], state) -> None:
        device = params[0].device
        self.params = params
        self.sizes = [param.numel() for param in params]
        # Per parameter: its segments' tasks and sizes, a table's rows, each task's rows of concatenated heads or a
        # head parameter whole.
        segments = [([task], [p.numel()]) if isinstance(task, int) else
                    (list(range(len(task))), [rows * p[0].numel() for rows in task]) if isinstance(task, tuple) else
                    (list(range(p.shape[0])), [p[0].numel()] * p.shape[0])
                    for p, task in zip(params, tasks)]
        self.counts = [len(of_param) for of_param, _ in segments]
        # From pinned memory: a pageable copy would wait for the GPU in the step that builds these (the H200 test).
        self.segment_task = _to_device(torch.tensor([t for of_param, _ in segments for t in of_param]), device)
        self.segment_sizes = _to_device(torch.tensor([n for _, sizes in segments for n in sizes]), device)
        # State kept elsewhere (loaded from another device, or the bank moved or cast since) joins its parameters.
        self.exp_avg, self.exp_avg_sq = (
            torch.cat([(state[p][key].to(p) if state[p] else torch.zeros_like(p)).reshape(-1) for p in params])
            for key in ("exp_avg", "exp_avg_sq"))
        self.steps = torch.cat([state[p]["step"].to(device, torch.float64).reshape(-1) if state[p] else
                                torch.zeros(count, dtype=torch.float64, device=device)
                                for p, count in zip(params, self.counts)])
        first_segment = 0
        for param, task, count, exp_avg, exp_avg_sq in zip(params, tasks, self.counts, self.exp_avg.split(self.sizes),
                                                           self.exp_avg_sq.split(self.sizes)):
            steps = self.steps[first_segment:first_segment + count]
            state[param].update(step=steps[0] if isinstance(task, int) else steps, exp_avg=exp_avg.view_as(param),
                                exp_avg_sq=exp_avg_sq.view_as(param))
            first_segment += count
        self.views = [(state[p]["step"], state[p]["exp_avg"], state[p]["exp_avg_sq"]) for p in params]
        # The parameters flat, viewed once: a view a parameter a step is a dispatch each.
        self.flat_params = [param.view(-1) for param in params]
        self._stepping = ((), None)  # (the parameters without a gradient, the segments that step on the device)

    def holds(self, params: list[torch.Tensor], state) -> bool:
        """Whether these are still the group's parameters, in the memory this object views (``param.data = ...``
        replaces it), and the optimizer's state still holds this object's views."""
        return len(params) == len(self.params) and all(
            param is mine and param.data_ptr() == flat.data_ptr() and state[param].get("step") is step
            and state[param].get("exp_avg") is exp_avg and state[param].get("exp_avg_sq") is exp_avg_sq
            for param, mine, flat, (step, exp_avg, exp_avg_sq) in zip(params, self.params, self.flat_params,
                                                                      self.views))

    def _per_element(self, per_segment: torch.Tensor) -> torch.Tensor:
        """[segments] values spread to the flat vector's elements."""
        return per_segment.repeat_interleave(self.segment_sizes, output_size=self.exp_avg.numel())

    def step(self, present: torch.Tensor, lr, weight_decay, betas, eps) -> None:
        """Steps the segments of the ``present`` [T] tasks whose parameter has a gradient; the rest keep
        everything. The update is torch.optim.AdamW's, each segment with its own step count; ``where`` (not a
        factor of 0) keeps the other segments, whatever their gradient holds."""
        beta1, beta2 = betas
        keep = present[self.segment_task]
        missing = tuple(i for i, param in enumerate(self.params) if param.grad is None)
        if missing:  # such a parameter does not step (as torch's AdamW skips a parameter without a gradient)
            if self._stepping[0] != missing:  # kept: a copy captured in a CUDA graph reads its host memory each replay
                _refuse_host_copy_while_capturing("the parameters without a gradient differ from the warmup steps'")
                stepping = torch.ones(len(self.params), dtype=torch.bool)
                stepping[list(missing)] = False
                self._stepping = missing, _to_device(stepping.repeat_interleave(torch.tensor(self.counts)),
                                                     keep.device)
            keep = keep & self._stepping[1]
        self.steps += keep
        steps = self.steps.clamp(min=1)  # segments never stepped keep 0 and are not written below
        dtype = self.exp_avg.dtype
        keep = self._per_element(keep)
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        param = torch.cat(self.flat_params)
        # One scratch vector for every intermediate, the moments and parameters updated in place.
        scratch = torch.lerp(self.exp_avg, grad, 1 - beta1)
        torch.where(keep, scratch, self.exp_avg, out=self.exp_avg)
        torch.mul(self.exp_avg_sq, beta2, out=scratch).addcmul_(grad, grad, value=1 - beta2)
        torch.where(keep, scratch, self.exp_avg_sq, out=self.exp_avg_sq)
        torch.sqrt(self.exp_avg_sq, out=scratch).div_(self._per_element(((1 - beta2**steps) ** 0.5).to(dtype)))
        scratch.add_(eps)
        torch.div(self.exp_avg, scratch, out=scratch).mul_(self._per_element((lr / (1 - beta1**steps)).to(dtype)))
        updated = torch.mul(param, 1 - lr * weight_decay, out=grad).sub_(scratch)  # the gradient is spent
        torch.where(keep, updated, param, out=param)
        torch._foreach_copy_(self.flat_params, param.split(self.sizes))


def _set_attribute(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    """Set the submodule or parameter of dotted ``name`` in ``model``."""
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, value)
