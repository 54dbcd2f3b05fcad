"""`bitfit-fast train --task-files NAME TRAIN VALIDATION ...`: several tasks trained together on one base model, in
mixed batches (see :class:`~bitfit_fast.task_bank.TaskBank`).

Sampling: every epoch takes every example of every task once (a small task is not repeated), all tasks shuffled
together and grouped by length, so a batch holds the tasks whose examples have similar lengths. Each step is each
task's own step on its examples in the batch: its loss is the mean over them, its gradient is clipped on its own,
and AdamW steps it on the batches that hold its examples only (:class:`~bitfit_fast.task_bank.TaskAdamW`; in fp16
not on a batch where its gradient overflowed, as its own run's loss scaler would skip that step). A task's
examples are its share of each batch, so an epoch gives it more, smaller steps than a run of its own at the same
``batch_size`` (the start of a run says how many). Every epoch
each task is evaluated on its own validation file, and ``OUTPUT_DIR/NAME/`` is a run directory of its own
(``run_config.json``, ``biases/`` of its best epoch by its metric, ``biases-last/``) that `bitfit-fast eval`,
`predict` and `serve` take like any run.

One process, no checkpoint to resume and no micro-batching: a joint run is meant for the many small tasks that one
model serves.
"""

import contextlib
import dataclasses
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..backend import check_backend_option
from ..errors import UserError
from ..files import write_json
from ..task_bank import TaskBank
from . import data as data_lib
from .config import TrainConfig
from .distributed import Dist, default_device
from .evaluation import best_evaluation, evaluate
from .loop import TrainingDiverged
from .models import load_for_training, model_source
from .plots import plot_curves
from .run import (
    BEST_BIASES,
    CHECKPOINT_NAME,
    CURVES_NAME,
    LAST_BIASES,
    RUN_CONFIG_NAME,
    SUMMARY_NAME,
    Run,
    check_holds_no_run,
    check_holds_only,
    check_not_in_use,
    check_output_dir,
    claimed,
    write_run_config,
)

# What a run directory holds: a task named so would collide with the joint run's own files.
RUN_FILES = {CHECKPOINT_NAME, RUN_CONFIG_NAME, SUMMARY_NAME, CURVES_NAME, BEST_BIASES, LAST_BIASES}
NAME_MAX = 255  # bytes of a file name: Linux's, macOS' and Windows' file systems allow no more


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    """One task of a joint run: its name (its run directory's) and its files."""

    name: str
    train_file: str
    validation_file: str


class _OneTask(nn.Module):
    """The bank seen as one task's model, for :func:`evaluate`: logits of that task's width."""

    def __init__(self, bank: TaskBank, name: str):
        super().__init__()
        self.bank, self.name = bank, name

    def forward(self, labels=None, **batch):
        logits = self.bank([self.name] * batch["input_ids"].shape[0], **batch)
        return dataclasses.make_dataclass("Output", ["logits"])(logits[:, :self.bank.tasks[self.name].num_labels])


def _check(config: TrainConfig, tasks: list[TaskFiles], device: torch.device) -> None:
    config.check_trains()
    names = [task.name for task in tasks]
    if len(tasks) < 2:
        raise UserError("--task-files trains several tasks together: give it at least twice (one task: use "
                        "--train-file and --validation-file)")
    # Compared as a case-insensitive file system (macOS', Windows') would: Sport and sport are one directory there.
    if len({name.casefold() for name in names}) != len(names):
        raise UserError(f"--task-files names must differ, also in more than letter case (each names a directory), "
                        f"got {names}")
    for name in names:
        if not name or name != Path(name).name or name.startswith("."):
            raise UserError(f"--task-files name {name!r} must be a plain directory name: it names OUTPUT_DIR/{name}")
        if len(name.encode()) > NAME_MAX:
            raise UserError(f"--task-files name {name[:20]!r}... is {len(name.encode())} bytes long: it names a "
                            f"directory, which file systems allow at most {NAME_MAX} bytes; choose a shorter name")
        if name.casefold() in RUN_FILES:
            raise UserError(f"--task-files name {name!r} is a file of the joint run's directory: choose another name")
    if not config.saves_biases:
        raise UserError(f"--task-files trains BitFit tasks: --method {config.method} is not one")
    ignored = [name for name in ("task", "train_file", "validation_file", "resume", "save_every", "micro_batch_size")
               if getattr(config, name)]
    if ignored:  # the CLI refuses their options first; this is for callers of train_tasks
        raise UserError(f"a joint run takes each task's data from its TaskFiles and trains in one process, with no "
                        f"checkpoint to resume and no micro-batches: leave the TrainConfig's {', '.join(ignored)} "
                        "unset")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--task-files trains in one process: start it without torchrun")
    check_backend_option(config.bitfit.backend, config.resolved_precision(device))
    _check_output_dir(Path(config.output_dir), names)


def _check_output_dir(out: Path, names: list[str], locked: bool = False) -> None:
    """``out`` and its tasks' directories (``names``) hold nothing a joint run would overwrite, and no other run
    trains there; ``locked``: this process holds them (:func:`~bitfit_fast.train.run.claimed`)."""
    if not locked:
        check_not_in_use(out)
    check_holds_no_run(out, resume=False)
    # A joint run that stopped before its first epoch ended (a NaN loss, Ctrl-C) left its tasks' records alone: it
    # starts again. Anything else there is another's, a lone single-task record too (eval would read it as the run).
    check_holds_only(out, set(names), "joint run")
    for name in names:  # a task's directory holds no run, or a record of this joint run's that stopped
        check_output_dir(out / name, resume=False, locked=locked)


def _share_of_batches(example_task: list[str], lengths: list[int], config: TrainConfig) -> str:
    """What an epoch gives each task: the batches that hold its examples, and how many of them on average (a
    task's steps are as many, and as small, as its share of the batches)."""
    steps, examples = {}, {}
    for indices in data_lib.length_grouped_batches(lengths, config.batch_size, config.seed, 0):
        for name in {example_task[i] for i in indices}:
            steps[name] = steps.get(name, 0) + 1
        for i in indices:
            examples[example_task[i]] = examples.get(example_task[i], 0) + 1
    return ("each epoch, each task steps on the batches that hold its examples: " + ", ".join(
        f"{name} {steps[name]} steps of {examples[name] / steps[name]:.1f} examples"
        for name in dict.fromkeys(example_task))
        + f" on average (a run of its own: batches of {config.batch_size})")


def train_tasks(config: TrainConfig, tasks: list[TaskFiles], log=print) -> dict:
    """Train ``tasks`` together with ``config``'s model, method and protocol; returns the joint summary (also
    written as OUTPUT_DIR/run_summary.json)."""
    d = Dist(device=default_device())
    _check(config, tasks, d.device)
    out = Path(config.output_dir)
    names = [task.name for task in tasks]
    with contextlib.ExitStack() as claims:  # the joint run's directory and its tasks', which a run may be given too
        for directory in (out, *(out / name for name in names)):
            claims.enter_context(claimed(directory))
        _check_output_dir(out, names, locked=True)  # again: another run may have written there since
        return _train_tasks_claimed(config, tasks, log, d)


def _train_tasks_claimed(config: TrainConfig, tasks: list[TaskFiles], log, d: Dist) -> dict:
    """:func:`train_tasks` once its checks passed and its output directory is this process's."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    start = time.time()
    out = Path(config.output_dir)
    model_path = model_source(config.model)
    config = dataclasses.replace(config, precision=config.resolved_precision(d.device))
    task_data = {}
    for task in tasks:
        files = dict(train_file=str(Path(task.train_file).expanduser().resolve()),
                     validation_file=str(Path(task.validation_file).expanduser().resolve()))
        try:
            loaded = data_lib.load_local(files["train_file"], files["validation_file"], tuple(config.text_columns),
                                         config.label_column, config.regression)
        except data_lib.NotScoresError as error:
            raise data_lib.NotScoresError(f"{error} (if it is a task of classes: the tasks of a joint run share "
                                          "--regression, so train it in a run of its own)") from error
        task_data[task.name] = (loaded, files)
    first = next(iter(task_data.values()))[0]
    model, tokenizer, head, new_modules = load_for_training(config, first.num_labels, first.label_names, model_path)
    if not new_modules:  # a run of its own would start from that head
        log(f"--model {config.model or model_path} holds a trained classification head: a joint run gives each task "
            "a new output layer of its own instead (train a task alone to start from that head)")
    try:
        bank = TaskBank.new(model, {name: data.num_labels for name, (data, _) in task_data.items()}, config.bitfit,
                            head=config.bitfit.head or head)
    except ValueError as error:
        raise UserError(f"--model {config.model or model_path}: {error}") from error
    for name, (data, _) in task_data.items():
        bank.tasks[name].label_names = data.label_names
    bank.to(d.device).train()

    pad_id = data_lib.pad_id(tokenizer)
    encoded = {name: data_lib.encode(data_lib.limit(data.train, config.max_train_examples), tokenizer,
                                     config.max_length) for name, (data, _) in task_data.items()}
    validation = {name: {split: data_lib.encode(data_lib.limit(s, config.max_eval_examples), tokenizer,
                                                config.max_length) for split, s in data.validation.items()}
                  for name, (data, _) in task_data.items()}
    # All tasks' training examples in one list, with each example's task.
    types = None if any(e.token_type_ids is None for e in encoded.values()) else [
        types for e in encoded.values() for types in e.token_type_ids]
    joint = data_lib.Encoded([ids for e in encoded.values() for ids in e.input_ids], types,
                             [label for e in encoded.values() for label in e.labels])
    example_task = [name for name, e in encoded.items() for _ in range(len(e))]
    log(f"{len(tasks)} tasks together: " + ", ".join(
        f"{name} ({len(encoded[name])} train, {'scores' if data.num_labels == 1 else f'{data.num_labels} classes'})"
        for name, (data, _) in task_data.items()) + f" | {config.method} on {d.device}")
    lengths = [len(ids) for ids in joint.input_ids]
    log(_share_of_batches(example_task, lengths, config))
    for name, (data, files) in task_data.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        run_config = dataclasses.replace(config, model=config.model and model_path, output_dir=str(out / name),
                                         **files)
        write_run_config(Run(out / name, run_config, model_path, data.num_labels, data.label_names,
                             list(data.metrics), tuple(data.text_columns), data.label_column), name, out.resolve())

    optimizer = bank.optimizer(lr=config.resolved_learning_rate(), weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type, enabled=config.precision == "fp16")
    histories = {name: [] for name in task_data}
    losses = []
    step = 0
    for epoch in range(config.epochs):
        for indices in data_lib.length_grouped_batches(lengths, config.batch_size, config.seed, epoch):
            batch = {k: v.to(d.device) for k, v in data_lib.collate(joint, indices, pad_id, regression=True).items()}
            labels = batch.pop("labels")
            names = [example_task[i] for i in indices]
            with config.autocast(d.device):
                task_losses = bank.task_losses(bank(names, **batch), labels, names)
            scaler.scale(task_losses.sum()).backward()  # queued before the losses are read: the GPU runs it meanwhile
            held = {name: bank.tasks[name].index for name in dict.fromkeys(names)}
            values = task_losses.tolist()  # read once: a second read after the optimizer step would wait for it
            value = sum(values[index] for index in held.values()) / len(held)  # the mean of the tasks' mean losses
            if not math.isfinite(value):
                kept = (f"each task's best biases so far are kept in {out}/<task>/{BEST_BIASES}" if epoch
                        else "no biases were saved yet")
                raise TrainingDiverged(f"the loss became {value} at step {step + 1} (epoch {epoch + 1}); "
                                       f"{kept}. Lower the learning rate, or train in fp32.")
            scaler.unscale_(optimizer)
            norms = bank.clip_grad_norm_(config.max_grad_norm)
            if scaler.is_enabled():
                # fp16: a task whose gradient overflowed skips its step, as its own run's scaler would have it
                # skip; the others step (GradScaler.step would skip them all). The scale goes down all the same.
                norms = norms.tolist()
                finite = [name for name, index in held.items() if math.isfinite(norms[index])]
                if finite:
                    optimizer.step(finite)
            else:
                optimizer.step(names)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(dict(step=step, epoch=epoch + 1, loss=value))
            for name, index in held.items():
                histories[name].append(dict(step=step, epoch=epoch + 1, loss=values[index]))
        line = []
        for name, (data, _) in task_data.items():
            task_config = dataclasses.replace(config, regression=data.num_labels == 1)
            scores = {split: evaluate(_OneTask(bank, name), enc, task_config, data.metrics, d, pad_id)
                      for split, enc in validation[name].items()}
            histories[name].append(dict(step=step, epoch=epoch + 1, validation=scores))
            line.append(f"{name} " + ", ".join(f"{k} {v:.4f}" for k, v in next(iter(scores.values())).items()))
            split = next(iter(data.validation))
            if best_evaluation(histories[name], split, data.metrics[0]) is histories[name][-1]:
                bank.save_task(name, out / name / BEST_BIASES, into_run=True)
        log(f"epoch {epoch + 1}: " + " | ".join(line))

    summary = dict(config=config.to_dict(), tasks={}, steps=step, seconds=time.time() - start,
                   final_train_loss=losses[-1]["loss"] if losses else None, losses=losses)
    for name, (data, files) in task_data.items():
        bank.save_task(name, out / name / LAST_BIASES, into_run=True)
        split, metric = next(iter(data.validation)), data.metrics[0]
        best = best_evaluation(histories[name], split, metric)
        task_summary = dict(
            **files,
            epochs=[dict(epoch=h["epoch"], **h["validation"]) for h in histories[name] if "validation" in h],
            losses=[h for h in histories[name] if "loss" in h],
            best=dict(epoch=best["epoch"], split=split, metric=metric, value=best["validation"][split][metric]),
            saved_biases={BEST_BIASES: best["epoch"], LAST_BIASES: config.epochs})
        summary["tasks"][name] = task_summary
        write_json(out / name / SUMMARY_NAME, dict(task_summary, task=name, joint_run=str(out.resolve())))
        plot_curves(histories[name], out / name / CURVES_NAME, loss_title=f"training loss ({name}'s batches)")
        log(f"{name}: best {metric} {task_summary['best']['value']:.4f} (epoch {best['epoch']}); {out / name} is "
            "its run")
    write_json(out / SUMMARY_NAME, summary)
    return summary

