"""bitfit_fast: BitFit fine-tuning (train only the bias terms) with fused Triton kernels."""

__version__ = "0.1.0"

from .checkpoint import OtherBaseModelError, load_biases, save_biases
from .config import AppliedState, BitFitConfig
from .families import SUBSET_PATTERNS
from .graphs import GraphedStep
from .model import (
    FrozenNewWeightsWarning,
    QueryRowsBitFitLinear,
    UndeclaredBiasesWarning,
    apply,
    get_nb_trainable_parameters,
    merge,
    print_trainable_parameters,
)
from .modules import BitFitLayerNorm, BitFitLinear
from .task_bank import TaskBank

__all__ = [
    "SUBSET_PATTERNS",
    "AppliedState",
    "BitFitConfig",
    "BitFitLayerNorm",
    "BitFitLinear",
    "FrozenNewWeightsWarning",
    "GraphedStep",
    "OtherBaseModelError",
    "QueryRowsBitFitLinear",
    "TaskBank",
    "UndeclaredBiasesWarning",
    "__version__",
    "apply",
    "get_nb_trainable_parameters",
    "load_biases",
    "merge",
    "print_trainable_parameters",
    "save_biases",
]
