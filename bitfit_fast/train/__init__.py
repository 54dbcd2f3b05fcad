"""`bitfit-fast train` as a library, one module per job:

- ``config``: :class:`TrainConfig`, the run's options; ``data``: the corpora, tokenisation, batches; ``hub``: the
  Hugging Face hub, reached or refused in seconds; ``models``: the pre-trained encoder, its head and tokenizer;
- ``loop``: :func:`train`; ``evaluation``: metrics over a split (``metrics``: GLUE's) and the best epoch;
  ``distributed``: one process or many under torchrun; ``run``: the run directory, run_config.json and the
  checkpoint that resumes a run exactly; ``summary``: run_summary.json; ``plots``: the learning curves;
  ``lr_sweep``: the paper's learning-rate sweep; ``multitask``: several tasks trained together in mixed batches
  (``--task-files``), each saved as a run of its own.

`bitfit_fast.serve` (eval, predict) uses what this module exports.
"""

from . import data, metrics
from .config import LR_GRID, METHODS, TrainConfig, autocast
from .distributed import Dist, default_device, setup_distributed
from .evaluation import best_evaluation, evaluate
from .loop import StepEnd, TrainingDiverged, train
from .lr_sweep import sweep
from .models import load_pretrained, model_source, quiet_transformers
from .run import BEST_BIASES, CHECKPOINT_NAME, LAST_BIASES, RUN_CONFIG_NAME, Run, load_run

__all__ = [
    "BEST_BIASES",
    "CHECKPOINT_NAME",
    "LAST_BIASES",
    "LR_GRID",
    "METHODS",
    "RUN_CONFIG_NAME",
    "Dist",
    "Run",
    "StepEnd",
    "TrainConfig",
    "TrainingDiverged",
    "autocast",
    "best_evaluation",
    "default_device",
    "data",
    "evaluate",
    "load_pretrained",
    "load_run",
    "metrics",
    "model_source",
    "quiet_transformers",
    "setup_distributed",
    "sweep",
    "train",
]
