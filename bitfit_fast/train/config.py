"""TrainConfig: the options of a `bitfit-fast train` run; the BitFit options among them are a BitFitConfig."""

import dataclasses
import math

import torch

from ..config import BitFitConfig
from ..errors import check_max_norm

METHODS = ("bitfit", "subset", "full", "frozen")
LR_GRID = (1e-4, 4e-4, 7e-4, 1e-3)  # the paper's BitFit learning rates
MAX_LEARNING_RATE = 1.0  # AdamW moves each trained value by up to ~lr a step: beyond 1 nothing trains, it overflows
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype (None: off)


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` (a key of PRECISIONS) on ``device`` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def default_learning_rate(method: str, task: str | None) -> float:
    """The paper's learning rate for ``method`` on ``task``: 1e-3 for BitFit (1e-4 on MNLI), 1e-5 for full
    fine-tuning."""
    if method == "full":
        return 1e-5
    return 1e-4 if task == "mnli" else 1e-3


def weight_decay_problem(weight_decay: float, learning_rate: float) -> str | None:
    """What is wrong with a weight decay at a learning rate, or None. AdamW scales each trained value by
    1 - learning_rate * weight_decay a step: from 1 on every value is zeroed or flips its sign each step."""
    if weight_decay * learning_rate < 1:
        return None
    return (f"{weight_decay:g} at learning rate {learning_rate:g} would zero or flip every trained value each step "
            "(AdamW scales them by 1 - learning rate x weight decay): keep that product below 1 (the default "
            "decay is 0)")


@dataclasses.dataclass
class TrainConfig:
    """The options of a run: data, model, method and the paper's protocol (AdamW, no schedule, clipping).

    ``bitfit`` holds the options of :func:`bitfit_fast.apply` for the BitFit methods. ``method="subset"`` is BitFit
    with ``biases="subset"``: either one sets the other, so a run records one consistent pair."""

    model: str | None = None  # a Hugging Face name or path; None: the embedded all-MiniLM-L6-v2
    task: str | None = None  # a GLUE task; None with no files: the embedded BBC News
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    regression: bool = False
    method: str = "bitfit"  # one of METHODS
    bitfit: BitFitConfig = dataclasses.field(default_factory=BitFitConfig)  # for the methods bitfit and subset
    learning_rate: float | None = None  # None: 1e-3 (BitFit), 1e-4 (BitFit on MNLI), 1e-5 (full)
    weight_decay: float = 0.0
    epochs: int = 3
    batch_size: int = 8
    micro_batch_size: int | None = None  # None: the whole batch on CPU, the largest that fits on a GPU
    max_length: int = 128
    seed: int = 0
    split_seed: int = 0  # the embedded BBC News' train/validation split: fixed across --seed, unlike the order
    precision: str = "auto"  # fp32, bf16 or fp16 (autocast); "auto": see resolved_precision
    max_grad_norm: float = 1.0
    output_dir: str = "runs/bitfit"
    save_every: int = 0  # steps between checkpoints; 0: at the end of each epoch only
    resume: bool = False
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision must be auto or one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.learning_rate is not None and not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ValueError(f"learning_rate must be more than 0 and at most {MAX_LEARNING_RATE}, got "
                             f"{self.learning_rate!r}")
        decay = self.weight_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < math.inf:
            raise ValueError(f"weight_decay must be a number, 0 or more, got {decay!r}")
        for name in ("epochs", "batch_size", "max_length", "micro_batch_size", "max_train_examples",
                     "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_max_norm("max_grad_norm", self.max_grad_norm)
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every must be an integer, 0 or more (0: at each epoch's end), got "
                             f"{self.save_every!r}")
        if not isinstance(self.bitfit, BitFitConfig):
            raise ValueError(f"bitfit must be a BitFitConfig, got {self.bitfit!r}")
        self.text_columns = tuple(self.text_columns)
        if self.method == "subset" and self.bitfit.biases != "subset":
            self.bitfit = dataclasses.replace(self.bitfit, biases="subset")
        elif self.method == "bitfit" and self.bitfit.biases == "subset":
            self.method = "subset"

    def to_dict(self) -> dict:
        """JSON-ready options (run_config.json, run_summary.json)."""
        return dict(dataclasses.asdict(self), bitfit=self.bitfit.to_dict())

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config :meth:`to_dict` wrote, or that of an earlier version (backend and memory as fields of their
        own, no ``bitfit``; the embedded split drawn with ``seed``, no ``split_seed``)."""
        values = dict(values)
        values.setdefault("split_seed", values.get("seed", 0))
        if "bitfit" in values:
            values["bitfit"] = BitFitConfig.from_dict(values["bitfit"])
        else:
            values["bitfit"] = BitFitConfig(backend=values.pop("backend", "auto"),
                                            memory=values.pop("memory", "default"))
        return cls(**values)

    @property
    def saves_biases(self) -> bool:
        """The BitFit methods train biases and the head only, and save them (biases/, biases-last/)."""
        return self.method in ("bitfit", "subset")

    def check_trains(self) -> None:
        """Raise where the options would train nothing: a weight decay that zeroes or flips every trained value each
        step at the run's learning rate. Checked when training starts, not when a saved run's config loads: a run
        trained so before the check stays readable."""
        problem = weight_decay_problem(self.weight_decay, self.resolved_learning_rate())
        if problem:
            raise ValueError(f"weight_decay {problem}")

    def resolved_learning_rate(self) -> float:
        """The learning rate given, else the paper's default for the method and task."""
        return self.learning_rate if self.learning_rate is not None else default_learning_rate(self.method, self.task)

    def resolved_precision(self, device: torch.device) -> str:
        """The precision a run uses on ``device``: the one given, or for "auto" bf16 autocast on a GPU that has
        bf16 (the fused kernels' and tensor cores' fast path; fp32 GEMMs there run without tensor cores) and fp32
        elsewhere (CPU autocast is slower than fp32 on most CPUs)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"

    def autocast(self, device: torch.device):
        """The autocast context of the run's precision on ``device`` (a no-op for fp32)."""
        return autocast(self.resolved_precision(device), device)
