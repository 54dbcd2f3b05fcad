"""Evaluate, predict with and export the biases of `bitfit-fast train` runs: one base model is loaded, bias sets are
swapped on it. Every mistake (a directory that is not a run, a missing column, a moved base model) is a one-line
`UserError`."""

import copy
import json
import os
import shutil
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError

from .checkpoint import RUN_CONFIG_NAME, DamagedCheckpointError, OtherBaseModelError, load_biases
from .errors import UserError, first_line, quoted, quoted_keys
from .files import check_can_write, temporary_beside
from .model import merge
from .train import (
    BEST_BIASES,
    Run,
    autocast,
    data,
    default_device,
    evaluate,
    load_pretrained,
    load_run,
    model_source,
    quiet_transformers,
    setup_distributed,
)
from .train.evaluation import EVAL_BATCH_SIZE
from .train.run import is_run_record


class _BaseModels:
    """Base models by (path, head width, class names, method): a second run of the same base only swaps the
    biases."""

    def __init__(self):
        self.models = {}

    def load(self, run: Run):
        """(model in eval mode with the run's best biases loaded, tokenizer)."""
        key = (run.model_path, run.num_labels, tuple(run.label_names or ()), run.config.method)
        if key not in self.models:
            self.models[key] = _load_base(run)
        model, tokenizer = self.models[key]
        try:
            load_biases(model, run.path / BEST_BIASES)
        except OtherBaseModelError as error:
            raise _other_weights(run, error) from error
        except DamagedCheckpointError as error:  # only its training writes a run's biases: saving again is no fix
            raise UserError(f"{run.path / BEST_BIASES} is damaged{error.problem}: train the run again") from error
        except PermissionError:  # whole, but not this user's to read: the CLI says so
            raise
        except (OSError, ValueError) as error:
            raise UserError(f"{run.path / BEST_BIASES} could not be loaded ({first_line(error)}): it is damaged or "
                            "does not belong to this run; train the run again") from error
        return model.eval(), tokenizer


def _load_base(run: Run):
    """(the base model a run was trained on, with the run's head: its class names; its tokenizer)."""
    source = model_source(run.model_path, of_run=run.path)
    model, tokenizer, _ = load_pretrained(source, run.num_labels, run.label_names,
                                          f"{run.path}: its base model {run.model_path}")
    return model, tokenizer


def _other_weights(run: Run, error: OtherBaseModelError) -> UserError:
    """A run whose recorded base model holds other weights now (replaced by another of its shapes, another hub
    revision): what to do."""
    return UserError(f"{run.path}'s base model {run.model_path} holds other weights than the run was trained on "
                     f"({error.weight} differs), or its {BEST_BIASES}/ is another run's: give the run its model back "
                     f"(set \"model_path\" in {run.path / RUN_CONFIG_NAME} to a local copy of the one it was trained "
                     "on) or its own biases, or train it again")


def _run_validation(run: Run) -> dict[str, data.Split]:
    """The validation data the run was trained with."""
    file = run.config.validation_file
    if file:
        if not Path(file).is_file():
            raise UserError(f"{run.path} was trained with the validation file {file}, which does not exist now: "
                            "pass --validation-file with a copy of it")
        return {"validation": _labeled(run, file)}
    if run.config.task:
        return data.load_glue(run.config.task).validation
    return data.load_bbc_news(run.config.split_seed).validation


def _labeled(run: Run, file: str) -> data.Split:
    """A file labelled like the run's data: its text columns, its label column, its classes."""
    return data.load_labeled(file, run.text_columns, run.label_column, run.label_names)


def evaluate_checkpoints(paths: list[str], validation_file: str | None = None) -> dict[str, dict]:
    """Metrics of each run's best biases and the number of examples scored: {path: {split: {metric: value, ...,
    "examples": count}}}. The run's own validation data as its training scored it (its --max-eval-examples), or
    ``validation_file`` (labelled like the run's data: its text columns and label column, every example) for every
    run."""
    d = setup_distributed()
    runs = [load_run(path) for path in paths]  # every path checked before a model loads
    bases, results = _BaseModels(), {}
    for path, run in zip(paths, runs):
        splits = ({validation_file: _labeled(run, validation_file)} if validation_file else
                  {name: data.limit(split, run.config.max_eval_examples)
                   for name, split in _run_validation(run).items()})
        model, tokenizer = bases.load(run)
        model.to(d.device)
        results[path] = {
            name: dict(evaluate(model, data.encode(split, tokenizer, run.config.max_length), run.config,
                                run.metrics, d, data.pad_id(tokenizer)), examples=len(split.labels))
            for name, split in splits.items()
        }
    return results


def predict(path: str, texts: list[tuple[str, ...]] | None = None, input_file: str | None = None) -> list[dict]:
    """Predictions of a run's best biases, one dict per text: the run's text columns, then ``label`` and
    ``probabilities`` (class name: probability) for classification, ``score`` for regression. ``texts`` holds one
    tuple per example with a text for each of the run's text columns; ``input_file`` is a CSV/JSON/Parquet file
    with those columns."""
    run = load_run(path)
    columns = run.text_columns
    if input_file is not None:
        texts = data.load_texts(input_file, columns)
    elif not texts:
        raise UserError("nothing to predict: give --text (and --text-pair for two-text runs) or --input-file")
    for number, example in enumerate(texts, 1):
        if not all(text.strip() for text in example):  # as the server refuses it: nothing to classify
            raise UserError(f"example {number} has an empty text: there is nothing to classify; give it a text")
        if len(example) != len(columns):
            if len(columns) == 2:
                raise UserError(f"{path} was trained on two texts per example ({', '.join(columns)}): give each "
                                "--text its second text with --text-pair, or use --input-file with both columns")
            raise UserError(f"{path} was trained on one text per example ({columns[0]}): leave out --text-pair")
    model, tokenizer = _BaseModels().load(run)
    empty = _first_without_tokens(tokenizer, texts, run.config.max_length)
    if empty is not None:  # as the server refuses it: [CLS] [SEP] alone would get a label
        raise UserError(f"example {empty + 1} has no tokens (only spaces or characters the tokenizer drops): there "
                        "is nothing to classify; give it a text")
    device = default_device()
    model.to(device)
    encoded = data.encode(data.Split(texts, [0.0] * len(texts)), tokenizer, run.config.max_length)
    pad_id = data.pad_id(tokenizer)
    rows = []
    with torch.no_grad(), autocast(serving_precision([run], device), device):  # the precision eval scored it in
        for start in range(0, len(texts), EVAL_BATCH_SIZE):
            indices = list(range(start, min(start + EVAL_BATCH_SIZE, len(texts))))
            batch = data.pad(encoded, indices, pad_id)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            for i, row in zip(indices, logits):
                try:
                    rows.append(dict(zip(columns, texts[i]), **answer(row, run.label_names)))
                except UserError as error:
                    raise UserError(f"example {i + 1}: {error}") from error
    return rows


def answer(logits: torch.Tensor, label_names: list[str] | None) -> dict:
    """What predict says of one example's logits: ``score`` for regression (no label names), else ``label`` and
    ``probabilities`` (class name: probability, to 6 decimals). UserError for a NaN or infinite output, which no
    JSON carries."""
    logits = logits[:len(label_names) if label_names else 1]
    if not torch.isfinite(logits).all():
        raise UserError(f"the model's output is {logits.tolist()}, not finite: the run's biases are damaged or "
                        "diverged; train it again")
    if not label_names:
        return {"score": logits[0].item()}
    probabilities = logits.float().softmax(-1).tolist()
    return {"label": label_names[int(logits.argmax())],
            "probabilities": {name: round(p, 6) for name, p in zip(label_names, probabilities)}}


CHARACTERS_PER_TOKEN = 64  # more than a text needs for each of its tokens, whitespace between them included


def _read_no_further_than_needed(tokenizer, text: str, max_length: int) -> tuple[str, bool]:
    """(``text``, False), or for a text whose start already holds more than ``max_length`` tokens, (that start,
    True): a prefix cut at whitespace, whose words give the tokens the whole text's first words give, so that its
    first ``max_length`` tokens are the text's. The start read is CHARACTERS_PER_TOKEN · max_length characters,
    four times longer while it holds too few tokens (long words): a text of megabytes is then refused or cut
    (--truncate) from at most 5.4 times the characters its tokens need, not tokenised whole (seconds, and gigabytes
    of token lists) to count tokens no model reads; a text of no more tokens is read at most 2.4 times in all (the
    starts tried, then the whole). A text without whitespace to cut at (one long word, or a script written without
    spaces) is read whole."""
    limit = CHARACTERS_PER_TOKEN * max_length
    while len(text) > limit:
        start = text[:limit]
        space = max(start.rfind(c) for c in " \t\n\r")
        if space > 0 and len(tokenizer(start[:space], add_special_tokens=False)["input_ids"]) > max_length:
            return start[:space], True
        limit *= 4
    return text, False


def _without_tokens(tokenizer, encoded, texts: tuple[str, ...]) -> bool:
    """Whether one of ``texts`` gave no token of its own to ``encoded`` (only spaces, or characters its tokenizer
    drops): told by the encoding itself where the tokenizer is a fast one."""
    if encoded.is_fast:
        present = set(encoded.sequence_ids())
        return any(index not in present for index in range(len(texts)))
    return any(not tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)


def _first_without_tokens(tokenizer, texts: list[tuple[str, ...]], max_length: int) -> int | None:
    """The index of the first example one of whose texts gives no token (only spaces, or characters its tokenizer
    drops, such as zero-width spaces), or None. Every text is tokenised (cut to ``max_length`` tokens: a cut text
    has tokens where the whole has): a letter is no token where the tokenizer's normaliser drops it (NFKD and accent
    stripping, as ALBERT's does, leave of U+FE70 only a space)."""
    without = [index for column in zip(*texts)
               for index, ids in enumerate(tokenizer(list(column), add_special_tokens=False, truncation=True,
                                                     max_length=max_length)["input_ids"]) if not ids]
    return min(without, default=None)


def serving_precision(runs, device: torch.device) -> str:
    """The precision runs answer in on ``device``: the one they were trained and scored in (``eval``), or fp32
    where they differ (one batch runs in one precision: fp16's range would overflow what bf16 holds, bf16 rounds
    what fp16 keeps) or where it is bf16 on a GPU without bf16."""
    precisions = {run.config.resolved_precision(device) for run in runs}
    precision = precisions.pop() if len(precisions) == 1 else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32"
    return precision


class RunsPredictor:
    """`bitfit-fast serve RUN...`: the runs' tasks in one :class:`~bitfit_fast.task_bank.TaskBank` on their shared
    base model, answering mixed batches; the predictor of ``bitfit_fast.server``. A task is named by its run
    directory's name; an example is ``{"task": NAME, "text": "..."}``, with ``"text_pair"`` for a run trained on two
    text columns."""

    def __init__(self, paths: list[str], backend: str = "auto", truncate: bool = False):
        from .server import RequestError
        from .task_bank import TaskBank

        self._refuse = RequestError
        runs = {}
        for path in paths:
            run = load_run(path)
            name = run.path.resolve().name
            if name in runs:
                if runs[name].path.resolve() == run.path.resolve():
                    raise UserError(f"the run {path} is given twice: give it once")
                raise UserError(f"two runs are named {name!r} ({runs[name].path} and {path}): tasks are named by "
                                "their run directories, so rename one")
            runs[name] = run
        # The runs share one base model: the first's is loaded, and the bank checks every run's base weights
        # against it (a copy of the model elsewhere, a hub name and its local snapshot are the same model).
        first = next(iter(runs.values()))
        model, self.tokenizer = _load_base(first)
        try:
            self.bank = TaskBank.load(model, {name: run.path for name, run in runs.items()}, backend=backend).eval()
        except OtherBaseModelError as error:
            run = runs[error.task]
            if run.model_path == first.model_path:
                raise _other_weights(run, error) from error
            raise UserError(f"{run.path} was trained on {run.model_path} and {first.path} on {first.model_path}, "
                            f"whose weights differ ({error.weight}): the runs a server holds share one base model"
                            ) from error
        except (OSError, ValueError) as error:
            raise UserError(f"cannot serve these runs: {first_line(error)}") from error
        self.device = default_device()
        self.bank.to(self.device)
        self.precision = serving_precision(runs.values(), self.device)
        self.runs = runs
        self.tasks = list(runs)
        self.truncate = truncate  # a text past its task's max_length: cut to it (as predict does), or refused
        # The server checks examples in several threads at once, and a fast tokenizer's call sets its (shared)
        # truncation before encoding: one thread's max_length would cut another's text. A copy per thread.
        self._local = threading.local()
        self.pad_id = data.pad_id(self.tokenizer)

    def check(self, example: object) -> dict:
        """The example tokenised; RequestError (the client's message) for one this server cannot answer. Safe to
        call from several threads at once, as the server does."""
        shape = '{"task": NAME, "text": "...", "text_pair": "..." (for two-text tasks)}'
        if not isinstance(example, dict):
            raise self._refuse(f"an example is {shape}, got {type(example).__name__}")
        if "task" not in example:  # e.g. a list of examples under another key than "inputs"
            raise self._refuse(f"an example is {shape}, and several are {{\"inputs\": [example, ...]}}; got the keys "
                               f"{quoted_keys(sorted(example))}")
        unknown = sorted(set(example) - {"task", "text", "text_pair"})
        if unknown:  # a misspelt key would otherwise read as a missing text, or be dropped unseen
            raise self._refuse(f"unknown key{'s' if len(unknown) > 1 else ''} {quoted_keys(unknown)}: an example is "
                               f"{shape}")
        task = example["task"]
        if not isinstance(task, str):  # a number or a list: never a run's name, even where it reads as one
            raise self._refuse(f"'task' is a task's name, a string of {self.tasks}; got {json.dumps(task)[:80]}")
        if task not in self.runs:
            raise self._refuse(f"unknown task {quoted(task)}: this server knows {self.tasks}")
        run = self.runs[task]
        texts = [example.get("text"), example.get("text_pair")][:len(run.text_columns)]
        for key, text in zip(("text", "text_pair"), texts):
            if text is not None and not isinstance(text, str):
                raise self._refuse(f"'{key}' must be a string, got {json.dumps(text)[:80]}")
        if not all(isinstance(text, str) and text.strip() for text in texts):
            needed = "a non-empty 'text' and 'text_pair'" if len(texts) == 2 else "a non-empty 'text'"
            raise self._refuse(f"task {task!r} needs {needed}: an example is {shape}")
        if len(texts) == 1 and example.get("text_pair") is not None:
            raise self._refuse(f"task {task!r} reads one text: leave out 'text_pair'")
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, which no tokenizer reads
                raise self._refuse(f"a text of task {task!r} is not valid Unicode (a lone surrogate, such as "
                                   "\\ud800): send well-formed text") from None
        if not hasattr(self._local, "tokenizer"):
            self._local.tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer, most = self._local.tokenizer, run.config.max_length
        # A pair cut to the first text's tokens is not cut as predict cuts the whole pair: truncation's
        # "longest_first" keeps one token more of whichever text is longer in full.
        if len(texts) == 1 or not self.truncate:
            texts, cut = zip(*(_read_no_further_than_needed(tokenizer, text, most) for text in texts))
        else:
            cut = (False,) * len(texts)
        encoded = tokenizer(*texts, truncation=self.truncate, max_length=most if self.truncate else None)
        if not all(cut) and _without_tokens(tokenizer, encoded, texts):
            raise self._refuse(f"a text of task {task!r} has no tokens (only spaces or characters its tokenizer "
                               "drops): send text")
        length = len(encoded["input_ids"])
        if length > most:
            told = f"more than {most}" if any(cut) else str(length)
            raise self._refuse(f"the text is {told} tokens; task {task!r} reads at most {most}: shorten it (a server "
                               "started with --truncate cuts it)")
        return {"task": task, "input_ids": encoded["input_ids"], "token_type_ids": encoded.get("token_type_ids")}

    @property
    def serving(self) -> dict:
        """What GET /health says of how every batch runs: the device and the precision (a served answer is the
        model's in that precision, as predict's and eval's are)."""
        return {"device": self.device.type, "precision": self.precision}

    def describe(self, task: str) -> dict:
        """What GET /health says of a task: its class names (None: it answers a score), the texts an example
        gives, and the most tokens it reads (and whether a longer text is cut or refused)."""
        run = self.runs[task]
        return {"labels": run.label_names, "texts": ["text", "text_pair"][:len(run.text_columns)],
                "max_length": run.config.max_length, "longer": "cut" if self.truncate else "refused"}

    def predict(self, examples: list[dict]) -> list[dict | UserError]:
        """One mixed batch through the bank: {"task", "label", "probabilities"} or {"task", "score"} each, or for an
        example whose output is not finite (a damaged or diverged run), that error."""
        split = data.Encoded([e["input_ids"] for e in examples],
                             None if examples[0]["token_type_ids"] is None else [e["token_type_ids"] for e in examples],
                             [0.0] * len(examples))
        batch = data.pad(split, list(range(len(examples))), self.pad_id)
        tasks = [e["task"] for e in examples]
        with torch.no_grad(), autocast(self.precision, self.device):
            logits = self.bank(tasks, **{k: v.to(self.device) for k, v in batch.items()}).float().cpu()
        answers = []
        for task, row in zip(tasks, logits):
            try:
                answers.append(dict(task=task, **answer(row, self.runs[task].label_names)))
            except UserError as error:  # that example's alone: the batch's others are answered
                answers.append(UserError(f"task {task!r}: {error}"))
        return answers


def export(path: str, output_dir: str) -> tuple[Path, str]:
    """A run's best biases merged into its base model and saved as a plain Hugging Face model directory (weights,
    config with the run's class names, tokenizer) that transformers' ``from_pretrained`` loads without bitfit_fast.
    Written into a temporary directory beside ``output_dir`` and renamed into place, so ``output_dir`` holds the
    whole model or nothing; an existing non-empty ``output_dir`` is refused, never written over. Returns (the
    directory, the model's class name)."""
    run = load_run(path)
    if not output_dir.strip():
        raise UserError("the output directory is an empty name: name a new directory to export into")
    out = Path(output_dir).resolve()  # ".": the directory's own name, to write beside it
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise UserError(f"{output_dir} is the current directory (or holds it), which the export's rename would take "
                        "from under you: export into a new directory, e.g. a subdirectory")
    run_holding = next((d for d in (out, *out.parents) if is_run_record(d / RUN_CONFIG_NAME)), None)
    if run_holding is not None:  # one path, one meaning: what a run holds, only its training writes
        where = "is" if run_holding == out else "is inside"
        raise UserError(f"{output_dir} {where} the `bitfit-fast train` run {run_holding}, whose files only its "
                        "training writes: export into a directory outside it")
    check_can_write(out.parent, output_dir)  # where it is written beside and renamed
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{output_dir} {'is a file' if out.is_file() else 'already exists and is not empty'}: "
                        "export into a new or empty directory (it never writes over files)")
    model, tokenizer = _BaseModels().load(run)
    try:
        merge(model)
    except ValueError as error:  # biases the model's config cannot declare (ModernBERT subset, T5, ...)
        raise UserError(f"{path} cannot be exported as a plain Hugging Face model: {first_line(error)} Its biases "
                        "load with bitfit-fast (predict, serve, bitfit_fast.load_biases).") from error
    # A text is cut where the run cuts it (predict, eval): tokenizer(texts, truncation=True) does so with this.
    tokenizer.model_max_length = run.config.max_length
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(out)
    try:
        with quiet_transformers():  # no "Writing model shards" bar
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # onto nothing or an empty directory: both renames are atomic
    except (OSError, SafetensorError) as error:  # a full disk, a lost mount (safetensors: "I/O error: ...")
        if isinstance(error, SafetensorError) and "I/O error" not in str(error):
            raise
        raise UserError(f"{output_dir} could not be written ({first_line(error)}); nothing was written there") \
            from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, type(model).__name__
