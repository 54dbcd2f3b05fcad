"""The run summary (run_summary.json): options, metrics per epoch, the best epoch, which epoch each biases directory
holds, time, peak memory, tokens and padding, versions."""

import dataclasses
import time

import torch

from ..backend import uses_triton
from ..model import get_nb_trainable_parameters
from .config import TrainConfig
from .data import TaskData
from .distributed import Dist, all_reduce_sum
from .evaluation import best_evaluation
from .run import BEST_BIASES, LAST_BIASES


@dataclasses.dataclass
class TokenCounts:
    """This process's token counts: real (attention mask) and padded (batch shape), over ``steps`` steps."""

    real: int = 0
    padded: int = 0
    steps: int = 0


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of this process: allocated on the GPU, resident (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(config: TrainConfig, task: TaskData, model, history: list, start_time: float, tokens: TokenCounts,
              d: Dist, in_sync: bool, micro_batch_size: int) -> dict:
    """The run summary, JSON-ready, with what the options left to the machine: the micro-batch size each process
    ran (the largest that fits on a GPU: with dropout on, another size draws other masks) and the backend."""
    import transformers

    evaluations = [h for h in history if "validation" in h]
    first_split = next(iter(task.validation))
    metric = task.metrics[0]
    best = best_evaluation(history, first_split, metric)
    saved_biases = ({BEST_BIASES: best["epoch"], LAST_BIASES: evaluations[-1]["epoch"]}
                    if best and config.saves_biases else {})
    trainable, total = get_nb_trainable_parameters(model)
    # Every process's tokens (each counts its own shard's; the steps are the same on all).
    real, padded = int(all_reduce_sum(tokens.real, d)), int(all_reduce_sum(tokens.padded, d))
    return dict(
        config=config.to_dict(), task=task.name, world_size=d.world, ranks_in_sync=in_sync,
        micro_batch_size=micro_batch_size, backend=("triton" if uses_triton(config.bitfit.backend, torch.empty(
            0, device=d.device)) else "torch") if config.saves_biases else None,
        trainable_parameters=trainable, all_parameters=total, learning_rate=config.resolved_learning_rate(),
        epochs=[dict(epoch=h["epoch"], step=h["step"], **h["validation"]) for h in evaluations],
        best=dict(epoch=best["epoch"], split=first_split, metric=metric, value=best["validation"][first_split][metric])
        if best else None,
        saved_biases=saved_biases,  # directory: the epoch whose biases it holds
        final_train_loss=next((h["loss"] for h in reversed(history) if "loss" in h), None),
        seconds=time.time() - start_time, real_tokens=real, padded_tokens=padded,
        padded_tokens_per_batch=padded / max(1, tokens.steps),
        padding_waste=1 - real / padded if padded else 0.0,
        peak_memory_bytes=peak_memory_bytes(d.device), device=str(d.device),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
    )
