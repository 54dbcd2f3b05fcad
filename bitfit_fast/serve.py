"""Evaluate and predict with the biases of `bitfit-fast train` runs: one base model is loaded, bias sets are swapped
on it. Every mistake (a directory that is not a run, a missing column, a moved base model) is a one-line
`UserError`."""

import dataclasses
import json
from pathlib import Path

import torch

from . import data as data_lib
from .checkpoint import load_biases
from .data import UserError, first_line
from .trainer import (
    BEST_BIASES,
    RUN_CONFIG_NAME,
    TrainConfig,
    evaluate,
    load_pretrained,
    model_source,
    setup_distributed,
)

NOT_A_RUN_HINT = "pass the --output-dir of a `bitfit-fast train` run"


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


def load_run(path: str) -> Run:
    """A finished (or at least one epoch into) `bitfit-fast train` run; `UserError` for anything else."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{path} is not a directory: {NOT_A_RUN_HINT}")
    file = directory / RUN_CONFIG_NAME
    if not file.is_file():
        raise UserError(f"{path} is not a `bitfit-fast train` run (it has no {RUN_CONFIG_NAME}): {NOT_A_RUN_HINT}")
    try:
        record = json.loads(file.read_text())
        config = TrainConfig(**{**record["config"], "text_columns": tuple(record["config"]["text_columns"])})
        num_labels = record["num_labels"]
        label_names = record["label_names"] or (None if num_labels == 1 else [str(i) for i in range(num_labels)])
        run = Run(directory, config, record["model_path"], num_labels, label_names, record["metrics"],
                  tuple(record.get("text_columns", config.text_columns)),
                  record.get("label_column", config.label_column))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{file} could not be read ({first_line(error)}): it is damaged or was written by another "
                        "version of bitfit-fast; train the run again") from error
    if not (directory / BEST_BIASES).is_dir():
        reason = (f"--method {config.method} trains more than biases, and only biases are saved"
                  if config.method not in ("bitfit", "subset") else
                  f"no epoch has finished yet: continue the run with `bitfit-fast train --resume --output-dir {path}`")
        raise UserError(f"{path} has no {BEST_BIASES}/: {reason}")
    return run


class _BaseModels:
    """Base models by (path, head, method): a second run of the same base only swaps the biases."""

    def __init__(self):
        self.models = {}

    def load(self, run: Run):
        key = (run.model_path, run.num_labels, json.dumps(run.label_names), run.config.method)
        if key not in self.models:
            source = model_source(run.model_path)
            described = f"{run.path}: its base model {run.model_path}"
            model, tokenizer, _ = load_pretrained(source, run.num_labels, run.label_names, described)
            self.models[key] = (model, tokenizer)
        model, tokenizer = self.models[key]
        try:
            load_biases(model, run.path / BEST_BIASES)
        except (OSError, ValueError) as error:
            raise UserError(f"{run.path / BEST_BIASES} could not be loaded ({first_line(error)}): it is damaged or "
                            "does not belong to this run; train the run again") from error
        return model.eval(), tokenizer


def _run_validation(run: Run) -> dict[str, data_lib.Split]:
    """The validation data the run was trained with."""
    file = run.config.validation_file
    if file:
        if not Path(file).is_file():
            raise UserError(f"{run.path} was trained with the validation file {file}, which does not exist now: "
                            "pass --validation-file with a copy of it")
        return {"validation": _labeled(run, file)}
    if run.config.task:
        return data_lib.load_glue(run.config.task).validation
    return data_lib.load_bbc_news(run.config.seed).validation


def _labeled(run: Run, file: str) -> data_lib.Split:
    """A file labelled like the run's data: its text columns, its label column, its classes."""
    return data_lib.load_labeled(file, run.text_columns, run.label_column, run.label_names)


def evaluate_checkpoints(paths: list[str], validation_file: str | None = None) -> dict[str, dict]:
    """Metrics of each run's best biases: {path: {split: {metric: value}}}. The run's own validation data, or
    ``validation_file`` (labelled like the run's data: its text columns and label column) for every run."""
    d = setup_distributed()
    runs = [load_run(path) for path in paths]  # every path checked before a model loads
    bases, results = _BaseModels(), {}
    for path, run in zip(paths, runs):
        splits = {validation_file: _labeled(run, validation_file)} if validation_file else _run_validation(run)
        model, tokenizer = bases.load(run)
        model.to(d.device)
        pad_id = tokenizer.pad_token_id or 0
        results[path] = {
            name: evaluate(model, data_lib.encode(split, tokenizer, run.config.max_length), run.config, run.metrics,
                           d, pad_id, 32)
            for name, split in splits.items()
        }
    return results


def predict(path: str, texts: list[tuple[str, ...]] | None = None, input_file: str | None = None,
            batch_size: int = 32) -> list[dict]:
    """Predictions of a run's best biases, one dict per text: the run's text columns, then ``label`` and
    ``probabilities`` (class name: probability) for classification, ``score`` for regression. ``texts`` holds one
    tuple per example with a text for each of the run's text columns; ``input_file`` is a CSV/JSON/Parquet file
    with those columns."""
    run = load_run(path)
    columns = run.text_columns
    if input_file is not None:
        texts = data_lib.load_texts(input_file, columns)
    elif not texts:
        raise UserError("nothing to predict: give --text (and --text-pair for two-text runs) or --input-file")
    for example in texts:
        if len(example) != len(columns):
            if len(columns) == 2:
                raise UserError(f"{path} was trained on two texts per example ({', '.join(columns)}): give each "
                                "--text its second text with --text-pair, or use --input-file with both columns")
            raise UserError(f"{path} was trained on one text per example ({columns[0]}): leave out --text-pair")
    model, tokenizer = _BaseModels().load(run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    encoded = data_lib.encode(data_lib.Split(texts, [0.0] * len(texts)), tokenizer, run.config.max_length)
    pad_id = tokenizer.pad_token_id or 0
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            indices = list(range(start, min(start + batch_size, len(texts))))
            batch = data_lib.collate(encoded, indices, pad_id, regression=True)
            batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            for i, row in zip(indices, logits):
                prediction = dict(zip(columns, texts[i]))
                if run.num_labels == 1:
                    prediction["score"] = row.item()
                else:
                    probabilities = row.softmax(-1).tolist()
                    prediction["label"] = run.label_names[int(row.argmax())]
                    prediction["probabilities"] = {name: round(p, 6) for name, p in zip(run.label_names, probabilities)}
                rows.append(prediction)
    return rows
