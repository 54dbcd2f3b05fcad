"""BitFitConfig: the options of :func:`bitfit_fast.apply`, validated once, saved beside the biases.

Like PEFT's ``LoraConfig``: a dataclass whose fields carry their help text and whose ``__post_init__`` checks
every value, so a bad option fails with one line before the model is touched. What ``apply`` then finds in or
does to a model (the head it found, the biases it added, the dtypes it changed) is not an option: it is kept
apart, in :class:`AppliedState`.
"""

import dataclasses
from collections.abc import Sequence

import torch

from .backend import BACKENDS
from .fused_layer import MEMORY_MODES

# Named bias sets of ``biases=``; any other value is a list of module-name patterns.
BIAS_SETS = ("all", "subset")


def _help(text: str, default, choices: tuple | None = None) -> dataclasses.Field:
    """A field with its help text and, for a closed set of values, its choices: what the checks in
    ``__post_init__`` and a command line (`bitfit-fast train --backend`) both read."""
    return dataclasses.field(default=default, metadata={"help": text, "choices": choices})


@dataclasses.dataclass
class BitFitConfig:
    """How :func:`bitfit_fast.apply` sets a model up. Every field is checked on construction (and on
    ``dataclasses.replace``); ``apply(model, config, **overrides)`` takes one, ``save_biases`` saves it and
    ``load_biases`` sets a base model up with it."""

    biases: str | list[str] = _help(
        "'all' (every bias outside the head), 'subset' (the paper's query and intermediate biases, b_q and b_m2) "
        "or a list of module-name patterns (a full name, a dotted suffix, or a glob)", "all")
    backend: str = _help(
        "'auto' (Triton kernels for CUDA tensors, torch ops otherwise), 'triton' (the kernels always) or 'torch'",
        "auto", BACKENDS)
    train_head: bool = _help(
        "train the task head fully; False freezes it like the body and its biases follow `biases`", True)
    add_missing_biases: bool | None = _help(
        "give selected nn.Linear / nn.LayerNorm modules without a bias (and the trained head's) a zero one; "
        "None: only when none of the selected modules has a bias (bias-free encoders such as ModernBERT)", None)
    head: list[str] | None = _help(
        "names of the task head's modules; None: the top-level modules outside a Hugging Face model's base model "
        "(a module that wraps one must name them)",
        None)
    fuse_layers: bool = _help(
        "run recognised encoder layers (BERT, RoBERTa, ELECTRA, XLM-R, ...) as one fused layer each", True)
    memory: str = _help(
        "what fused layers save for the backward: 'default' (fastest), 'lean' (recomputes the pre-GELU "
        "activation), 'minimal' (also recomputes the QKV GEMM and attention)", "default", MEMORY_MODES)
    dtype: torch.dtype | None = _help(
        "store the frozen linear weights once in this floating dtype (torch.bfloat16 or its name 'bfloat16') "
        "instead of casting them every step under autocast; biases stay fp32", None)

    def __post_init__(self) -> None:
        if isinstance(self.biases, str):
            if self.biases not in BIAS_SETS:
                raise ValueError(
                    f"biases must be 'all', 'subset' or a list of module-name patterns, got {self.biases!r}")
        elif (not isinstance(self.biases, Sequence) or not self.biases
              or not all(isinstance(p, str) for p in self.biases)):
            raise ValueError(
                f"biases must be 'all', 'subset' or a non-empty list of module-name patterns, got {self.biases!r}")
        else:
            self.biases = list(self.biases)
        for field in dataclasses.fields(self):
            choices, value = field.metadata["choices"], getattr(self, field.name)
            if choices is not None and value not in choices:
                raise ValueError(f"{field.name} must be one of {choices}, got {value!r}")
        for name in ("train_head", "fuse_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.add_missing_biases is not None and not isinstance(self.add_missing_biases, bool):
            raise ValueError(f"add_missing_biases must be None, True or False, got {self.add_missing_biases!r}")
        if self.head is not None:
            if (isinstance(self.head, str) or not isinstance(self.head, Sequence)
                    or not all(isinstance(n, str) for n in self.head)):
                raise ValueError(f"head must be a list of module names such as ['classifier'], got {self.head!r}")
            self.head = list(self.head)
        self.dtype = floating_dtype(self.dtype)

    def to_dict(self) -> dict:
        """JSON-ready options: the dtype by its name."""
        values = dataclasses.asdict(self)
        values["dtype"] = dtype_name(self.dtype)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "BitFitConfig":
        """The config :meth:`to_dict` wrote; an unknown option is an error, not silently dropped."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown BitFitConfig options {unknown}: saved by a newer bitfit_fast? Upgrade it")
        return cls(**values)


@dataclasses.dataclass
class AppliedState:
    """What :func:`bitfit_fast.apply` found in and changed about a model: not options, but needed to undo it
    (:func:`bitfit_fast.merge`) and to explain a checkpoint that does not fit (:func:`bitfit_fast.load_biases`)."""

    head: list[str]  # the task head's top-level modules, as found or given
    added_biases: list[str] = dataclasses.field(default_factory=list)  # modules that received a zero bias
    weight_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # weights stored in `dtype`: originals

    def to_dict(self) -> dict:
        """JSON-ready, as saved in bitfit_config.json."""
        return dataclasses.asdict(self)


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """A dtype's name as saved in JSON ('bfloat16'), None for None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def floating_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch.dtype from itself or its name ('bfloat16'), as saved in JSON."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    return dtype
