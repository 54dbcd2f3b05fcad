"""Evaluation: the task's metrics over a whole validation split, sharded over processes, and which epoch scored
best."""

import math

import torch

from . import data as data_lib
from . import metrics as metrics_lib
from .config import TrainConfig
from .distributed import Dist, gather


def evaluate(model, encoded: data_lib.Encoded, config: TrainConfig, metric_names, d: Dist, pad_id: int,
             batch_size: int) -> dict:
    """Metrics over the whole split: each rank scores a share, outputs are gathered before computing them."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][d.rank::d.world]
    outputs, labels, indices = [], [], []
    with torch.no_grad(), config.autocast(d.device):
        for idx in batches:
            batch = {k: v.to(d.device) for k, v in data_lib.collate(encoded, idx, pad_id, config.regression).items()}
            outputs.append(model(**batch).logits.float().cpu())
            labels.append(batch["labels"].cpu())
            indices += idx
    model.train()
    parts = gather((torch.cat(outputs) if outputs else None, torch.cat(labels) if labels else None, indices), d)
    parts = [p for p in parts if p[0] is not None]
    return metrics_lib.compute(list(metric_names), torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def _score(evaluation: dict, split: str, metric: str) -> float:
    value = evaluation["validation"][split][metric]
    return value if math.isfinite(value) else -math.inf  # an undefined score is never the best


def best_evaluation(history: list, split: str, metric: str) -> dict | None:
    """The first evaluation with the highest score of the task's metric on its first validation split."""
    return max((h for h in history if "validation" in h), key=lambda h: _score(h, split, metric), default=None)
