"""Evaluate and predict with saved bias checkpoints: one base model is loaded, bias sets are swapped on it."""

import dataclasses
import json
from pathlib import Path

import torch

from . import data as data_lib
from .checkpoint import load_biases
from .trainer import RUN_CONFIG_NAME, TrainConfig, evaluate, load_task, setup_distributed


def _run(path: str) -> dict:
    file = Path(path) / RUN_CONFIG_NAME
    if not file.is_file() or not (Path(path) / "biases").is_dir():
        raise FileNotFoundError(f"{path} is not a finished `bitfit-fast train` output directory (no {RUN_CONFIG_NAME} or biases/)")
    run = json.loads(file.read_text())
    run["config"] = TrainConfig(**{**run["config"], "text_columns": tuple(run["config"]["text_columns"])})
    return run


class _BaseModels:
    """Base models by (path, labels): a second checkpoint of the same base only swaps the biases."""

    def __init__(self):
        self.models = {}

    def load(self, path: str, run: dict):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        key = (run["model_path"], run["num_labels"], json.dumps(run["label_names"]))
        if key not in self.models:
            kwargs = dict(num_labels=run["num_labels"])
            if run["label_names"]:
                kwargs.update(id2label=dict(enumerate(run["label_names"])),
                              label2id={n: i for i, n in enumerate(run["label_names"])})
            model = AutoModelForSequenceClassification.from_pretrained(run["model_path"], **kwargs)
            self.models[key] = (model, AutoTokenizer.from_pretrained(run["model_path"]))
        model, tokenizer = self.models[key]
        load_biases(model, Path(path) / "biases")
        return model.eval(), tokenizer


def evaluate_checkpoints(paths: list[str], validation_file: str | None = None) -> dict[str, dict]:
    d = setup_distributed()
    bases, results = _BaseModels(), {}
    for path in paths:
        run = _run(path)
        config = run["config"]
        if validation_file:
            config = dataclasses.replace(config, train_file=config.train_file or validation_file,
                                         validation_file=validation_file, task=None)
        task = load_task(config)
        model, tokenizer = bases.load(path, run)
        model.to(d.device)
        pad_id = tokenizer.pad_token_id or 0
        results[path] = {
            name: evaluate(model, data_lib.encode(split, tokenizer, config.max_length), config, run["metrics"], d,
                           pad_id, 32)
            for name, split in task.validation.items()
        }
    return results


def predict(path: str, texts: list[tuple[str, ...]] | None = None, input_file: str | None = None,
            batch_size: int = 32) -> list[dict]:
    run = _run(path)
    config = run["config"]
    if input_file:
        split = data_lib.load_local(input_file, input_file, config.text_columns, config.text_columns[0],
                                    regression=True).train  # the label column is not used here
        texts = split.texts
    model, tokenizer = _BaseModels().load(path, run)
    encoded = data_lib.encode(data_lib.Split(texts, [0.0] * len(texts)), tokenizer, config.max_length)
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            idx = list(range(start, min(start + batch_size, len(texts))))
            batch = data_lib.collate(encoded, idx, tokenizer.pad_token_id or 0, regression=True)
            batch.pop("labels")
            logits = model(**batch).logits.float()
            for i, row in zip(idx, logits):
                if run["num_labels"] == 1:
                    rows.append(dict(text=texts[i], score=row.item()))
                else:
                    probs = row.softmax(-1)
                    label = int(probs.argmax())
                    name = run["label_names"][label] if run["label_names"] else label
                    rows.append(dict(text=texts[i], label=name, probability=round(probs[label].item(), 4)))
    return rows
