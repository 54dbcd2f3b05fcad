"""Evaluation: the task's metrics over a whole validation split, sharded over processes, and which epoch scored
best."""

import math

import torch

from . import data as data_lib
from . import metrics as metrics_lib
from .config import TrainConfig
from .distributed import Dist, gather

EVAL_BATCH_SIZE = 32  # examples per batch of a forward without gradients (eval, predict): a micro-batch at least


def evaluate(model, encoded: data_lib.Encoded, config: TrainConfig, metric_names, d: Dist, pad_id: int,
             batch_size: int = EVAL_BATCH_SIZE) -> dict:
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
    parts = [p for p in gather((outputs, labels, indices), d) if p[2]]
    scored = torch.tensor([i for p in parts for i in p[2]], dtype=torch.long)
    if not torch.equal(scored.sort().values, torch.arange(len(encoded))):  # a shard lost or scored twice
        raise RuntimeError(f"evaluation scored {len(scored)} examples of {len(encoded)}, not each once")
    # In the split's order, as one process would: the same metrics to the last bit on any number of processes.
    order = scored.argsort()
    return metrics_lib.compute(list(metric_names), torch.cat([o for p in parts for o in p[0]])[order],
                               torch.cat([y for p in parts for y in p[1]])[order])


def _score(evaluation: dict, split: str, metric: str) -> float:
    value = evaluation["validation"][split][metric]
    return value if math.isfinite(value) else -math.inf  # an undefined score is never the best


def best_evaluation(history: list, split: str, metric: str) -> dict | None:
    """The first evaluation with the highest score of the task's metric on its first validation split."""
    return max((h for h in history if "validation" in h), key=lambda h: _score(h, split, metric), default=None)
