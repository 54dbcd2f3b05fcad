"""bitfit_fast: BitFit fine-tuning (train only the bias terms) with fused Triton kernels.

The public names load on first use (PEP 562), like transformers' own: `bitfit-fast` starts, and answers Ctrl-C
with one line, before torch has loaded.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module that defines it.
_EXPORTS = {
    "OtherBaseModelError": "checkpoint", "load_biases": "checkpoint", "save_biases": "checkpoint",
    "AppliedState": "config", "BitFitConfig": "config",
    "SUBSET_PATTERNS": "families",
    "GraphedStep": "graphs",
    "FrozenNewWeightsWarning": "model", "QueryRowsBitFitLinear": "model", "UndeclaredBiasesWarning": "model",
    "apply": "model", "get_nb_trainable_parameters": "model", "merge": "model", "print_trainable_parameters": "model",
    "BitFitLayerNorm": "modules", "BitFitLinear": "modules",
    "TaskBank": "task_bank",
}

__all__ = [  # _EXPORTS' names, written out for the tools that read __all__ without running it
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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # found here from now on, without this call
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what static tools read
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
