"""Input checks and launch helpers shared by the kernels."""

import functools
import os
import weakref

import torch

# Triton decides at decoration time whether kernels are compiled or interpreted on CPU (numpy), so the
# environment at import is what counts: setting TRITON_INTERPRET=1 later has no effect on these kernels.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(ValueError):
    """An input the Triton kernels cannot take; the message says what to change."""


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class LastResults:
    """The values last computed from a few tensors, kept for the next call on the same tensor, unchanged since (its
    version counter): what several launches of one step derive from the step's row indices is made once. A step
    interleaves a few such tensors (a BERT bank's backward: the rows' tasks, the sequences' first rows' tasks and
    the embeddings' padded rows' tasks), so the last ``size`` are kept, by weak reference: a new tensor at a freed
    one's address is not taken for it.

    A CUDA graph being captured never takes a value computed outside it, nor the eager code one computed in a
    capture: a graph must record the computation itself (its replays see new inputs in the same tensors, whose
    version counters a replay does not move), and a capture's values live in its graph's memory. Inference tensors
    have no version counter: their values are computed every time."""

    def __init__(self, size: int = 4):
        self._size = size
        self._entries = []  # (key, weak reference to the tensor, value), the most recent last

    def get(self, tensor: torch.Tensor, key, compute):
        """``compute()``, or what it returned for ``tensor`` and ``key`` last time."""
        if tensor.is_inference():
            return compute()
        in_capture = capturing()
        key = (tensor._version, key, in_capture)
        for entry in self._entries:
            if entry[0] == key and entry[1]() is tensor:
                return entry[2]
        value = compute()
        # Entries of dead tensors go, and with a capture's start or end those of the other side.
        kept = [entry for entry in self._entries if entry[1]() is not None and entry[0][2] == in_capture]
        self._entries = [*kept, (key, weakref.ref(tensor), value)][-self._size:]
        return value


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Raise unless ``tensor`` is on CUDA, or on CPU under the interpreter and not bfloat16."""
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu" and INTERPRETER:
        if tensor.dtype == torch.bfloat16:
            raise KernelInputError(
                f"{name} is bfloat16, which the Triton CPU interpreter cannot multiply (triton#11584: it multiplies "
                "bit patterns). Use float32 or float16 on CPU, or run on a CUDA GPU."
            )
        return
    raise KernelInputError(
        f"{name} is on {tensor.device}; the Triton kernels need CUDA tensors. To run them on CPU set "
        "TRITON_INTERPRET=1 before importing bitfit_fast, or use backend='torch'."
    )


def check_compute_tensor(name: str, tensor: torch.Tensor, ndim: int | None = None) -> None:
    """A tensor the kernels read or write in its own dtype: supported dtype, usable device, row-contiguous."""
    if not isinstance(tensor, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name} has dtype {tensor.dtype}; supported are float32, float16 and bfloat16")
    if ndim is not None and tensor.dim() != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous; call .contiguous() first")
    check_device(name, tensor)


def check_vector(name: str, tensor: torch.Tensor | None, size: int, device: torch.device,
                 tasks: int | None = None) -> None:
    """A per-feature vector (bias, LayerNorm gamma/beta), or with ``tasks`` a table of one per task [tasks, size]:
    read as fp32 whatever its float dtype."""
    if tensor is None:
        return
    if not tensor.is_floating_point():
        raise KernelInputError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    shape = (size,) if tasks is None else (tasks, size)
    if tuple(tensor.shape) != shape:
        raise KernelInputError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise KernelInputError(f"{name} is on {tensor.device} but the input is on {device}; move them together")
    if not tensor.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous")


def check_bias(name: str, bias: torch.Tensor | None, size: int, rows: int, row_task: torch.Tensor | None,
               device: torch.device) -> None:
    """A bias (LayerNorm beta): a vector [size] shared by every row, or with ``row_task`` a table [T, size] of
    which row i adds row ``row_task[i]`` (per-example task biases)."""
    if row_task is None or bias is None:
        check_vector(name, bias, size, device)
        return
    if bias.dim() != 2 or bias.shape[0] == 0:
        raise KernelInputError(f"{name} must be a [tasks, {size}] table with row_task, got {tuple(bias.shape)}")
    check_vector(name, bias, size, device, tasks=bias.shape[0])  # whole: viewing a row costs a dispatch
    check_row_task(row_task, rows, device)


def check_row_task(row_task: torch.Tensor | None, rows: int, device: torch.device) -> None:
    """Each row's task: an integer [rows] tensor on the rows' device (its values, in [0, T), are the caller's to
    keep: bitfit_fast.TaskBank checks the names or indices it is given)."""
    if row_task is None:
        return
    if row_task.dtype not in (torch.int32, torch.int64) or tuple(row_task.shape) != (rows,):
        raise KernelInputError(f"row_task must be an integer ({rows},) tensor, one task per row; got "
                               f"{row_task.dtype} {tuple(row_task.shape)}")
    if row_task.device != device or not row_task.is_contiguous():
        raise KernelInputError(f"row_task must be contiguous and on {device}, got {row_task.device}")


def check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Raise unless every given tensor is on ``device``, the device of the pass's input."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise KernelInputError(f"{name} is on {tensor.device} but the input is on {device}; move them together")


def launches_on_input_device(host_function):
    """Runs a host function with the GPU of its first argument (a tensor, or a tuple of them) current: Triton
    launches on the current device, which need not be the one holding the tensors (a model moved to cuda:1
    without torch.cuda.set_device); the device is switched only where they differ."""

    @functools.wraps(host_function)
    def run(first, *args, **kwargs):
        tensor = first if isinstance(first, torch.Tensor) else next((t for t in first if t is not None), None)
        if tensor is None or not tensor.is_cuda or tensor.device.index == torch.cuda.current_device():
            return host_function(first, *args, **kwargs)
        with torch.cuda.device(tensor.device):
            return host_function(first, *args, **kwargs)

    return run


def check_rows(name: str, tensor: torch.Tensor) -> int:
    """Number of rows of a (..., features) input; an empty batch is an error, not a silent no-op."""
    rows = tensor.numel() // max(tensor.shape[-1], 1) if tensor.dim() else 0
    if tensor.dim() == 0 or rows == 0 or tensor.shape[-1] == 0:
        raise KernelInputError(f"{name} is empty (shape {tuple(tensor.shape)}); drop empty batches before the forward")
    return rows


def check_dropout(p: float, seed: int | torch.Tensor | None) -> None:
    """Raise unless p is in [0, 1) and, for p > 0, a seed is given: the backward regenerates the mask from it."""
    if not 0.0 <= p < 1.0:
        raise KernelInputError(f"dropout probability must be in [0, 1), got {p}")
    if p > 0.0 and seed is None:
        raise KernelInputError("dropout needs a seed: the backward regenerates the mask from it")


def seed_pointer(seed: int | torch.Tensor | None, p: float, device: torch.device, unused: torch.Tensor) -> torch.Tensor:
    """The kernels' ``seed_ptr``: the dropout seed as a [1] int64 tensor on ``device``. The kernels read the seed
    from memory so that a CUDA graph, which replays launch arguments as captured, still draws a new mask each
    replay from a seed drawn on the device (``torch.randint(..., device=...)``) inside the graph. An int seed is
    written into a new tensor (one small fill). Without dropout nothing is read: ``unused`` stands in."""
    if p == 0.0:
        return unused
    if not isinstance(seed, torch.Tensor):
        return torch.full((1,), seed, dtype=torch.int64, device=device)
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
        raise KernelInputError(f"a seed tensor must hold one int64 on {device}, got {seed.dtype} "
                               f"{tuple(seed.shape)} on {seed.device}")
    return seed


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 matmuls follow torch's TF32 switch so that both backends round alike. fp16/bf16 operands take
    Triton's default ("tf32"), which leaves them exact: their mantissas fit in TF32's."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if not INTERPRETER and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# Host arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions, ~5 us a call on
# the host (the H200 host profile at 86e182c counted ~100 a step).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def row_bucket(rows: int) -> int:
    """Autotuning key for the token count: powers of 4 from 256 to 65536, so that dynamic padding re-tunes at most
    five times per shape (tile choice changes with the number of row blocks, not with a few rows more or less)."""
    bucket = 256
    while bucket < min(rows, 65536):
        bucket *= 4
    return bucket


# Programs per SM of a persistent row loop. These loops are bandwidth-bound and keep one tile per program in
# flight, so the count is what hides memory latency. Timed on an H200 at BERT-base's shapes (bitfit_fast_benches.sweep,
# benches/results/gpu/sweep.json), with the 2-warp tiles of the linear gradient pass and the q/k/v gather: 16 per SM
# against 8 and 4, FC1's GELU pass 0.229 / 0.232 / 0.318 ms, the gather 0.089 / 0.097 / 0.130 ms; the LayerNorm
# backward (4 warps) 0.082 ms at each count. Programs that do not fit at once wait for a slot.
PROGRAMS_PER_SM = 16


_MULTIPROCESSORS: dict[int, int] = {}


@torch.compiler.assume_constant_result  # torch.compile takes the count as a constant, not a traced query
def _multiprocessors(device_index: int) -> int:
    # Cached: the properties query costs ~10 us of host time, and a step launches ~50 such loops. In a dict:
    # dynamo traces through functools.cache's wrapper (with a warning), ignoring the constant mark.
    if device_index not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return _MULTIPROCESSORS[device_index]


def reduction_programs(rows: int, device: torch.device) -> int:
    """Programs of a persistent row loop: PROGRAMS_PER_SM per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        return min(rows, PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None else
                                                             torch.cuda.current_device()))
    return min(rows, 4)
