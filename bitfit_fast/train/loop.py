"""The training loop behind `bitfit-fast train`: BitFit with the paper's protocol, on one device or many.

Protocol (Ben Zaken et al.): AdamW, gradient clipping 1.0, no schedule or warm-up, evaluation every epoch.
Batches are padded dynamically and grouped by length; a batch larger than memory allows is split into
micro-batches whose gradients add up to the big batch's. Under `torchrun` every rank takes its share of each
batch, and the only gradients there are, those of the biases and the head, are summed over the ranks in one buffer.
Checkpoints are written atomically and hold everything needed to continue exactly where a run stopped.
"""

import contextlib
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..backend import check_backend_option
from ..checkpoint import save_biases
from ..errors import UserError
from ..files import write_json
from ..model import get_nb_trainable_parameters
from . import data as data_lib
from .config import TrainConfig
from .distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    params_in_sync,
    setup_distributed,
    sum_gradients,
)
from .evaluation import EVAL_BATCH_SIZE, best_evaluation, evaluate
from .models import build_model, model_source
from .plots import plot_curves
from .run import (
    BEST_BIASES,
    CHECKPOINT_NAME,
    CURVES_NAME,
    LAST_BIASES,
    SUMMARY_NAME,
    Progress,
    Run,
    check_continues,
    check_output_dir,
    check_unfinished,
    claimed,
    load_checkpoint,
    save_checkpoint,
    temporaries_in,
    write_run_config,
)
from .summary import TokenCounts, summarize


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; what the run saved before is kept (the message says what)."""


@dataclasses.dataclass(frozen=True)
class StepEnd:
    """What an ``on_step_end`` callback of :func:`train` is given after each optimizer step."""

    step: int  # steps so far, counted over the whole run (a resumed run goes on counting)
    epoch: int  # from 1
    batch: int  # the batch just trained, from 1 within the epoch
    loss: float  # its mean loss over all processes
    checkpointed: bool  # whether checkpoint.pt now holds this step


def find_micro_batch(model, encoded: data_lib.Encoded, config: TrainConfig, d: Dist, pad_id: int, start: int) -> int:
    """Largest micro-batch (halving from ``start``: the rank's share of a batch, or a resumed run's size) for which
    a forward and backward on the longest examples fit in GPU memory. Its dropout draws leave the run's generators
    as they were: the run then draws what it would with that size given."""
    longest = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]), reverse=True)
    size = start
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        while size > 1:
            batch = data_lib.collate(encoded, longest[:size], pad_id, config.regression)
            batch = {k: v.to(d.device) for k, v in batch.items()}
            try:
                with config.autocast(d.device):
                    model(**batch).loss.backward()
                break
            except torch.cuda.OutOfMemoryError:
                size //= 2
            finally:
                model.zero_grad(set_to_none=True)
                del batch
                torch.cuda.empty_cache()
    return max(size, 1)


def _absolute(file: str | None) -> str | None:
    return None if file is None else str(Path(file).expanduser().resolve())


def _checked_config(config: TrainConfig, d: Dist) -> tuple[TrainConfig, str]:
    """Every check that needs no model or data, before anything loads; the :func:`resolved_config`."""
    config.check_trains()
    check_output_dir(Path(config.output_dir), config.resume, locked=not d.main)  # the main process locks it
    check_backend_option(config.bitfit.backend, config.resolved_precision(d.device))
    return resolved_config(config, d.device)


def resolved_config(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, str]:
    """The config as its run records it (absolute paths: the run can be evaluated, resumed or predicted from any
    directory; the precision used on ``device``) and the model's source."""
    model_path = model_source(config.model)
    config = dataclasses.replace(config, model=config.model and model_path, train_file=_absolute(config.train_file),
                                 validation_file=_absolute(config.validation_file),
                                 precision=config.resolved_precision(device))
    return config, model_path


def train(config: TrainConfig, log=print, on_step_end: Sequence[Callable[[StepEnd], None]] = ()) -> dict:
    """Train, evaluate every epoch, checkpoint; returns the run summary (also written as run_summary.json).

    `biases/` holds the epoch with the best validation score, `biases-last/` the last epoch (BitFit methods).
    ``log`` prints the main process's messages; each of ``on_step_end`` is called with a :class:`StepEnd` after
    every optimizer step and its checkpoint, if one is due (to watch a run, or, in tests, to stop it there)."""
    d = setup_distributed()
    say = log if d.main else (lambda *_: None)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    start_time = time.time()
    out = Path(config.output_dir)
    config, model_path = _checked_config(config, d)
    with claimed(out) if d.main else contextlib.nullcontext():
        if d.main:  # again: another run may have written there since
            check_output_dir(out, config.resume, locked=True)
        if config.resume:
            check_unfinished(out / CHECKPOINT_NAME, config.epochs, d.world)
        return _train_claimed(config, model_path, d, say, start_time, on_step_end)


def _train_claimed(config: TrainConfig, model_path: str, d: Dist, say: Callable, start_time: float,
                   on_step_end: Sequence[Callable[[StepEnd], None]]) -> dict:
    """:func:`train` once its checks passed and its output directory is this process's."""
    out = Path(config.output_dir)
    task = data_lib.load_task(config)
    config = dataclasses.replace(config, regression=task.num_labels == 1)  # GLUE's STS-B is a regression too
    if config.resume:
        check_continues(out, config, task.num_labels, task.label_names)
    model, tokenizer = build_model(config, task.num_labels, task.label_names, model_path)
    model.to(d.device).train()
    if d.rank:  # each rank its own dropout masks from here: equal draws would mask every shard alike
        torch.manual_seed(config.seed + 100_003 * d.rank)
    pad_id = data_lib.pad_id(tokenizer)
    train_data = data_lib.encode(data_lib.limit(task.train, config.max_train_examples), tokenizer, config.max_length)
    validation = {name: data_lib.encode(data_lib.limit(split, config.max_eval_examples), tokenizer, config.max_length)
                  for name, split in task.validation.items()}
    trainable_count, total_count = get_nb_trainable_parameters(model)
    say(f"{task.name}: {len(train_data)} train / {sum(map(len, validation.values()))} validation examples, "
        f"{task.num_labels} {'outputs' if task.num_labels == 1 else 'classes'} | {config.method}: "
        f"{trainable_count:,} of {total_count:,} parameters train ({100 * trainable_count / total_count:.4f}%) | "
        f"{d.world} process(es) on {d.device}")
    say(f"model {model_path}; newly initialised, trained with the head: "
        f"{', '.join(model.bitfit_new_modules) or 'none (the checkpoint holds every weight, its head too)'}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.resolved_learning_rate(), weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type, enabled=config.precision == "fp16")

    checkpoint = out / CHECKPOINT_NAME
    data = {"training": data_lib.fingerprint(train_data),
            **{name: data_lib.fingerprint(split) for name, split in validation.items()}}
    position, history, progress = dict(epoch=0, batch=0, step=0), [], None
    tokens = TokenCounts()  # this process's
    if config.resume:
        position, history, progress = load_checkpoint(checkpoint, model, optimizer, scaler, d, data)
        if progress is not None:
            tokens, start_time = TokenCounts(**progress.tokens), start_time - progress.seconds
        else:
            say(f"{checkpoint} was written by an earlier bitfit-fast: its data is not checked, and the summary's "
                "tokens and time count this command's only")
        done = position["epoch"] == config.epochs  # stopped after its last checkpoint, before its summary
        say(f"resumed from {checkpoint}: " + (f"its {config.epochs} epochs are trained; writing what it has left"
                                              if done else f"epoch {position['epoch'] + 1}, batch {position['batch']}, "
                                                           f"step {position['step']}"))
        killed = temporaries_in(out)
        if killed:
            say(f"note: {', '.join(killed)} in {out} is what a save killed before its rename left; delete it")
    local = -(-config.batch_size // d.world)  # the largest share of a batch: the first ranks take one more
    # A resume splits as the run did; on a GPU the search starts there and keeps that size where it still fits
    # (another --memory, a busier GPU may not).
    start = min(progress.micro_batch_size, local) if progress else local
    micro = config.micro_batch_size or (
        find_micro_batch(model, train_data, config, d, pad_id, start) if d.device.type == "cuda" else start)
    micro = min(micro, local)
    broadcast_from_main(params, d)

    def progress_now() -> Progress:
        return Progress(data, time.time() - start_time, micro, dataclasses.asdict(tokens))
    if d.main:  # only now: a run that fails to start leaves no record (nor the directory: see run.claimed)
        write_run_config(Run(out, config, model_path, task.num_labels, task.label_names, list(task.metrics),
                             tuple(task.text_columns), task.label_column), task.name)
    first_split, metric = next(iter(task.validation)), task.metrics[0]

    def save_if_best() -> None:
        """Saves the biases as `biases/` where the epoch just scored is the best. After the epoch's checkpoint: the
        biases saved never belong to an epoch the checkpoint does not hold (saved before it, a kill in between
        left them to an epoch that a resume with other options might redo and score lower)."""
        if d.main and config.saves_biases and history and best_evaluation(history, first_split, metric) is history[-1]:
            save_biases(model, out / BEST_BIASES, into_run=True)
    if config.resume and position["batch"] == 0:  # a kill may have come between the checkpoint and its biases
        save_if_best()

    lengths = [len(ids) for ids in train_data.input_ids]
    # The loss scale set up (as a run's first scaled loss sets it, or a resume's): a rank without an example in a
    # step scales no loss, and would unscale gradients by a scale that is not there.
    scaler.scale(torch.zeros((), device=d.device))
    step = position["step"]
    for epoch in range(position["epoch"], config.epochs):
        batches = data_lib.length_grouped_batches(lengths, config.batch_size, config.seed, epoch)
        first = position["batch"] if epoch == position["epoch"] else 0
        bar = None
        if d.main and config.progress and sys.stderr.isatty():  # a bar in a log is a line of carriage returns
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                       mininterval=1.0)
        epoch_start, epoch_tokens = time.time(), 0
        for index in range(first, len(batches)):
            shard = batches[index][d.rank::d.world]  # a short last batch may leave a rank none: it adds zeros
            loss_sum = 0.0
            for offset in range(0, len(shard), micro):
                piece = shard[offset:offset + micro]
                batch = data_lib.collate(train_data, piece, pad_id, config.regression)
                # Counted on the host, before the copy: on the GPU a count is a sync before the forward.
                real = int(batch["attention_mask"].sum())
                tokens.real += real
                tokens.padded += batch["input_ids"].numel()
                batch = {k: v.to(d.device) for k, v in batch.items()}
                epoch_tokens += real
                with config.autocast(d.device):
                    loss = model(**batch).loss
                # The mean over the whole batch, once every rank's share is summed.
                scaler.scale(loss * (len(piece) / len(batches[index]))).backward()
                loss_sum += loss.item() * len(piece)
            sum_gradients(params, d)
            batch_loss = all_reduce_sum(loss_sum, d) / len(batches[index])
            if not math.isfinite(batch_loss):
                kept = (f"the last good checkpoint, {checkpoint}, is kept" if checkpoint.is_file()
                        else "no checkpoint was written yet")
                raise TrainingDiverged(
                    f"the loss became {batch_loss} at step {step + 1} (epoch {epoch + 1}, batch {index + 1}); {kept}. "
                    "Lower the learning rate, or train in fp32."
                )
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens.steps += 1
            history.append(dict(step=step, epoch=epoch + 1, loss=batch_loss))
            if bar is not None:
                bar.update(1)
                tokens_per_s = epoch_tokens * d.world / (time.time() - epoch_start)
                bar.set_postfix(loss=f"{batch_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            checkpointed = bool(config.save_every) and step % config.save_every == 0
            if checkpointed:
                save_checkpoint(checkpoint, model, optimizer, scaler, dict(epoch=epoch, batch=index + 1, step=step),
                                history, d, progress_now())
            for callback in on_step_end:
                callback(StepEnd(step, epoch + 1, index + 1, batch_loss, checkpointed))
        if bar is not None:
            bar.close()
        scores = {name: evaluate(model, enc, config, task.metrics, d, pad_id, max(micro, EVAL_BATCH_SIZE))
                  for name, enc in validation.items()}
        history.append(dict(step=step, epoch=epoch + 1, validation=scores))
        say(f"epoch {epoch + 1}: " + " | ".join(f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                                                 for split, m in scores.items()))
        save_checkpoint(checkpoint, model, optimizer, scaler, dict(epoch=epoch + 1, batch=0, step=step), history, d,
                        progress_now())
        save_if_best()
        position = dict(epoch=epoch + 1, batch=0, step=step)

    summary = summarize(config, task, model, history, start_time, tokens, d, params_in_sync(model, d), micro)
    if d.main:
        if config.saves_biases:
            save_biases(model, out / LAST_BIASES, into_run=True)
        write_json(out / SUMMARY_NAME, summary)
        plot_curves(history, out / CURVES_NAME)
        best = summary["best"]
        saved = (f"; {BEST_BIASES}/ holds epoch {best['epoch']}, {LAST_BIASES}/ epoch {summary['epochs'][-1]['epoch']}"
                 if config.saves_biases else "")
        say(f"best {best['metric']} {best['value']:.4f} (epoch {best['epoch']}){saved}; wrote {out}/{SUMMARY_NAME}")
    barrier(d)
    return summary
