"""Which task each row of a mixed batch belongs to: the mechanism under per-example task biases.

A :class:`~bitfit_fast.task_bank.TaskBank` turns each trained bias of an applied model into a table [T, N], one row
per task, and runs the model inside :func:`example_tasks` with each example's task. Every BitFit op then adds to
each row its own task's bias (``torch_ops.bias_rows``; the Triton kernels gather it in their epilogue) and gives the
table the per-task sums of the gradient (``torch_ops.column_sums``). This module maps the batch's examples to the
rows an op sees: a module's input [B, ..., d] (or sequence first, [S, B, ..., d]) here, the fused encoders'
real-token rows in ``unpadding.Tokens``.
"""

import contextlib
import contextvars
import threading

import torch

_EXAMPLE_TASKS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("bitfit_fast_example_tasks",
                                                                                      default=None)
# How many example_tasks blocks are open, in any thread: while none is, current() reads no context variable, which
# torch.compile cannot trace (a graph break in every forward of a model that is no bank's); a plain global it guards.
_open_blocks = 0
_open_blocks_lock = threading.Lock()


@contextlib.contextmanager
def example_tasks(tasks: torch.Tensor):
    """Within the block, example i of every batch the model runs belongs to task ``tasks[i]`` ([B] integers)."""
    global _open_blocks
    token = _EXAMPLE_TASKS.set(tasks.long())
    with _open_blocks_lock:
        _open_blocks += 1
    try:
        yield
    finally:
        with _open_blocks_lock:
            _open_blocks -= 1
        _EXAMPLE_TASKS.reset(token)


def recompute_with_tasks(modules) -> None:
    """Hugging Face's gradient checkpointing runs a layer's forward again in the backward, after the
    :func:`example_tasks` block has closed: each of ``modules``' checkpointing function (set by
    ``gradient_checkpointing_enable``, whenever it was called) is wrapped, once, so that the function it checkpoints
    runs, both times, with the examples' tasks of its first run."""
    for module in modules:
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None and not getattr(checkpoint, "keeps_example_tasks", False):
            module._gradient_checkpointing_func = _keeping_example_tasks(checkpoint)


def _keeping_example_tasks(checkpoint):
    def checkpoint_with_tasks(function, *args, **kwargs):
        tasks = current()
        if tasks is None:
            return checkpoint(function, *args, **kwargs)

        def with_tasks(*function_args, **function_kwargs):
            with example_tasks(tasks):
                return function(*function_args, **function_kwargs)

        return checkpoint(with_tasks, *args, **kwargs)

    checkpoint_with_tasks.keeps_example_tasks = True
    return checkpoint_with_tasks


def current() -> torch.Tensor | None:
    """The examples' tasks [B] set by :func:`example_tasks`, or None outside it."""
    return _EXAMPLE_TASKS.get() if _open_blocks else None


def required(part: str) -> torch.Tensor:
    """The examples' tasks, for a ``part`` of the model ("head", "attention") that exists only inside a TaskBank's
    forward; raises outside it."""
    tasks = current()
    if tasks is None:
        raise RuntimeError(f"this model's {part} belongs to a TaskBank: call the bank, not the model")
    return tasks


def check_batch_size(tasks: torch.Tensor, batch: int) -> None:
    """Raise unless ``tasks`` gives one task per example of a batch of ``batch`` examples."""
    if tasks.shape[0] != batch:
        raise ValueError(f"the batch has {batch} examples but {tasks.shape[0]} example tasks were given")


def of_module_input(x: torch.Tensor, examples_dim: int = 0) -> torch.Tensor | None:
    """Each row's task for a module input x whose dimension ``examples_dim`` holds the examples: [B, ..., d], or
    with ``examples_dim=1`` sequence first, [S, B, ..., d] (rows in x's order), or None outside
    :func:`example_tasks`."""
    tasks = current()
    if tasks is None:
        return None
    check_batch_size(tasks, x.shape[examples_dim])
    rows_per_example = x.shape[examples_dim + 1:-1].numel()
    tasks = tasks.to(x.device)
    # One row per example (a pooler's or a head's input): the tasks tensor itself, the one every such op of the step
    # shares, so that the kernels sort its rows by task once (``bitfit_fast_kernels.task_tables``).
    tasks = tasks if rows_per_example == 1 else tasks.repeat_interleave(rows_per_example)
    # Sequence first: each of the leading positions holds the batch's examples in turn.
    return tasks.repeat(x.shape[:examples_dim].numel()) if examples_dim else tasks
