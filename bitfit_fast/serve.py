"""Evaluate and predict with the biases of `bitfit-fast train` runs: one base model is loaded, bias sets are swapped
on it. Every mistake (a directory that is not a run, a missing column, a moved base model) is a one-line
`UserError`."""

from pathlib import Path

import torch

from .checkpoint import load_biases
from .errors import UserError, first_line
from .train import BEST_BIASES, Run, data, evaluate, load_pretrained, load_run, model_source, setup_distributed


class _BaseModels:
    """Base models by (path, head, method): a second run of the same base only swaps the biases."""

    def __init__(self):
        self.models = {}

    def load(self, run: Run):
        """(model in eval mode with the run's best biases loaded, tokenizer)."""
        key = (run.model_path, run.num_labels, tuple(run.label_names or ()), run.config.method)
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
    return data.load_bbc_news(run.config.seed).validation


def _labeled(run: Run, file: str) -> data.Split:
    """A file labelled like the run's data: its text columns, its label column, its classes."""
    return data.load_labeled(file, run.text_columns, run.label_column, run.label_names)


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
        results[path] = {
            name: evaluate(model, data.encode(split, tokenizer, run.config.max_length), run.config, run.metrics,
                           d, data.pad_id(tokenizer), 32)
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
        texts = data.load_texts(input_file, columns)
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
    encoded = data.encode(data.Split(texts, [0.0] * len(texts)), tokenizer, run.config.max_length)
    pad_id = data.pad_id(tokenizer)
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            indices = list(range(start, min(start + batch_size, len(texts))))
            batch = data.collate(encoded, indices, pad_id, regression=True)
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
