"""A BitFit training step captured once as a CUDA graph and replayed for every batch of the same shapes.

A fused step launches ~100 Triton kernels and as many torch ops, each costing the host tens of microseconds: on an
H200 the BERT-base step at batch 256 kept the GPU busy 30 ms of its 42 (benches/results/gpu/host-profile.txt). A
replayed graph launches the whole step (forward, backward, gradient clipping, optimizer) as one. What a graph
needs, the fused path provides: no host sync inside the step (``unpadding.Tokens`` keeps a batch's padding under
its mask while capturing, where it would otherwise ask the GPU whether there is any, and drops the mask of a batch
declared free of padding, ``batch_without_padding``), dropout seeds that the kernels read from
device memory and that are drawn on the device inside the graph (so each replay draws new masks), and a capturable
optimizer. Unpadding is what a graph cannot do (every batch would have another token count): a graphed step
computes padding tokens, masked, where the eager step drops them.
"""

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable

import torch

# Set by GraphedStep while it runs and captures a batch it found free of padding (see ``batch_without_padding``).
_UNPADDED = contextvars.ContextVar("bitfit_fast_unpadded_batch", default=False)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_not_capturing(what: str) -> None:
    """Raise inside a CUDA graph capture for ``what``, something whose replays would silently repeat what the
    capture saw (a dropout seed drawn on the host)."""
    if capturing():
        raise RuntimeError(f"{what} cannot be captured in a CUDA graph: each replay would draw the capture's dropout "
                           "masks again. Use the Triton backend with memory='default', or train without the graph")


@contextlib.contextmanager
def batch_without_padding():
    """Declares the batch of the forwards inside free of padding (its attention mask, if any, all ones; the caller
    checked). While a graph captures, the token layout then drops the attention mask it receives: it cannot ask
    the GPU whether the mask masks anything, and transformers builds an all-True mask during a capture (5.17: even
    for a batch given none), which the layout would otherwise keep, attending under it."""
    token = _UNPADDED.set(True)
    try:
        yield
    finally:
        _UNPADDED.reset(token)


def declared_without_padding() -> bool:
    """Whether the current batch was declared free of padding (``batch_without_padding``)."""
    return _UNPADDED.get()


def _signature(batch: dict) -> tuple:
    return tuple((key, tuple(value.shape), value.dtype, value.device) for key, value in sorted(batch.items()))


@dataclasses.dataclass
class _Capture:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict
    loss: torch.Tensor
    learning_rates: list  # each group's lr at capture, where a float


class GraphedStep:
    """``step(batch) -> loss``: zero the gradients, forward under autocast, backward, clip the gradients' global
    norm to ``max_grad_norm`` (None: no clipping), optimizer step; the detached loss is returned. The same training
    as running those lines on every batch, on a GPU in one launch.

    On a GPU the first batch of each new set of shapes is run eagerly ``warmup`` times (on a side stream, as CUDA
    graphs ask: kernels compile and tune, the optimizer state and the allocator settle), then captured; the trained
    parameters and the optimizer state are then put back as they were before the warmup, and the graph replays
    that batch: it trains once, as any other. Every later batch of those shapes is copied into the graph's inputs
    and replayed. The optimizer must be Adam or AdamW (the state a warmup creates is reset to theirs, zeros) and
    capturable (``capturable=True`` or ``fused=True``); the model must not sync the host inside its step. A graph
    keeps the learning rate it was captured with: a schedule needs it as a tensor (``lr=torch.tensor(1e-3)``),
    which the step reads from memory; a changed float raises. Elsewhere (CPU) every step runs eagerly.
    ``autocast``: the dtype of ``torch.autocast``, or None. ``drop_full_masks``: a batch whose ``attention_mask``
    is all ones (one host sync a step asks) or that has none replays the graph of the batch without one, captured
    as unpadded (``batch_without_padding``); a graph captured with a mask attends under it, padding or not (on an
    H200 that cost a BERT-base step 8.6 of 38.6 ms of GPU work). For encoders whose attention mask is the padding
    mask (the fused families); False keeps every mask.

        step = GraphedStep(model, optimizer, max_grad_norm=1.0, autocast=torch.bfloat16)
        for batch in batches:  # dicts of tensors, already on the model's device
            loss = step(batch)
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = 1.0,
                 autocast: torch.dtype | None = None, warmup: int = 2,
                 loss: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None, drop_full_masks: bool = True):
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 step (kernels compile and tune in the first), got {warmup}")
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            raise ValueError(f"GraphedStep takes torch.optim.Adam or AdamW, got {type(optimizer).__name__}: the "
                             "state its warmup creates is reset to Adam's initial state, zeros")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.autocast = autocast
        self.warmup = warmup
        self.loss = loss or (lambda model, batch: model(**batch).loss)
        self.drop_full_masks = drop_full_masks
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._captures: dict[tuple, _Capture] = {}
        self._pool = None  # one memory pool shared by the graphs of every shape

    def _eager(self, batch: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        device_type = next(iter(batch.values())).device.type
        # No autocast weight cache: a graph would keep the casts of its capture.
        with torch.autocast(device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None,
                            cache_enabled=False):
            loss = self.loss(self.model, batch)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return loss.detach()

    def _check_optimizer(self) -> None:
        defaults = self.optimizer.defaults
        if not (defaults.get("capturable") or defaults.get("fused")):
            raise ValueError(f"{type(self.optimizer).__name__} is not capturable: a CUDA graph replays its step only "
                             "with capturable=True (e.g. torch.optim.AdamW(params, capturable=True)) or fused=True")

    @torch.no_grad()
    def _snapshot(self) -> tuple[list, dict]:
        state = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items() if isinstance(v, torch.Tensor)}
                 for p in self.params if p in self.optimizer.state}
        return [p.detach().clone() for p in self.params], state

    @torch.no_grad()
    def _restore(self, snapshot: tuple[list, dict]) -> None:
        """Parameters and optimizer state back to ``snapshot``, in place (the graph holds their addresses); state
        the snapshot lacks, created since, back to Adam's initial zeros."""
        values, state = snapshot
        for p, value in zip(self.params, values, strict=True):
            p.copy_(value)
            for name, tensor in self.optimizer.state.get(p, {}).items():
                if isinstance(tensor, torch.Tensor):
                    saved = state.get(id(p), {}).get(name)
                    tensor.copy_(saved) if saved is not None else tensor.zero_()

    def _capture(self, batch: dict) -> _Capture:
        self._check_optimizer()
        snapshot = self._snapshot()
        inputs = {key: value.clone() for key, value in batch.items()}
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._eager(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph, and stay there
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self._eager(inputs)
        except BaseException:
            # A model that cannot be captured keeps what it had trained: the warmup steps are undone. (After a
            # sticky CUDA error the restore fails too; the capture's error is the one to see.)
            with contextlib.suppress(Exception):
                self._restore(snapshot)
            raise
        self._pool = graph.pool()
        self._restore(snapshot)
        return _Capture(graph, inputs, loss, self._float_learning_rates())

    def _float_learning_rates(self) -> list:
        return [group["lr"] if not isinstance(group["lr"], torch.Tensor) else None
                for group in self.optimizer.param_groups]

    def __call__(self, batch: dict) -> torch.Tensor:
        if not batch or not all(isinstance(value, torch.Tensor) for value in batch.values()):
            raise TypeError("a batch is a non-empty dict of tensors")
        if not next(iter(batch.values())).is_cuda:
            return self._eager(batch)
        mask = batch.get("attention_mask")
        unpadded = self.drop_full_masks and (mask is None or bool(mask.all()))
        if unpadded:
            # No padding: the graph of the batch without its mask (the same computation), whose attention needs no
            # mask and whose last layer may run the first tokens only. A captured mask would stay a mask: the
            # layout cannot ask the GPU during a capture. The question is one sync a step, before the replay.
            batch = {key: value for key, value in batch.items() if key != "attention_mask"}
        key = _signature(batch)
        capture = self._captures.get(key)
        if capture is None:
            with batch_without_padding() if unpadded else contextlib.nullcontext():
                capture = self._captures[key] = self._capture(batch)
        else:
            if self._float_learning_rates() != capture.learning_rates:
                raise ValueError("the learning rate changed since the step was captured, and the graph replays the "
                                 "float it saw: give the optimizer lr=torch.tensor(...) to schedule it")
            for name, value in batch.items():
                capture.inputs[name].copy_(value)
        capture.graph.replay()
        return capture.loss.clone()
