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

from .errors import check_max_norm

# Set by GraphedStep while it runs and captures a batch it found free of padding (see ``batch_without_padding``).
_UNPADDED = contextvars.ContextVar("bitfit_fast_unpadded_batch", default=False)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph. (``bitfit_fast_kernels.utils`` has its own: the
    library runs without the kernels, and the kernels without the library.)"""
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


# A TaskBank's batch: its examples' task indices, beside the model's inputs and the labels.
TASKS = "tasks"


def _bank_loss(bank, batch: dict) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key not in (TASKS, "labels")}
    return bank.loss(bank(batch[TASKS], **inputs), batch["labels"], batch[TASKS])


def _model_loss(model, batch: dict) -> torch.Tensor:
    """The loss the model computes itself (a Hugging Face model, given the batch's labels)."""
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("the model returned no loss: put the labels in the batch, or give GraphedStep a loss=")
    return loss


def _signature(batch: dict) -> tuple:
    return tuple((key, tuple(value.shape), value.dtype, value.device) for key, value in sorted(batch.items()))


@dataclasses.dataclass
class _Capture:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict
    loss: torch.Tensor
    settings: tuple  # what the graph replays as captured (``GraphedStep._settings``)
    grads: list  # the parameters' gradients the graph writes
    addresses: tuple  # where it writes the parameters and the optimizer state (``GraphedStep._addresses``)


def _kept_accumulators(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The trained parameters whose gradient accumulator (autograd's AccumulateGrad node) something keeps alive. A
    node lives while a graph or a view's gradient function refers to it, bound to the stream it was made on; one
    that only a view made here refers to dies with that view, so a mark put through one view is seen through the
    next only on a node kept alive. (A frozen parameter has none.)"""
    def accumulator(param: torch.Tensor):
        return param.view_as(param).grad_fn.next_functions[0][0]

    trained = [param for param in params if param.requires_grad]
    with torch.inference_mode(False), torch.enable_grad():
        for param in trained:
            accumulator(param).metadata["bitfit_fast_probe"] = True
        return [param for param in trained if accumulator(param).metadata.get("bitfit_fast_probe")]


class GraphedStep:
    """``step(batch) -> loss``: zero the gradients, forward under autocast, backward, clip the gradients' global
    norm to ``max_grad_norm`` (None: no clipping), optimizer step; the detached loss is returned. The same training
    as running those lines on every batch, on a GPU in one launch.

    On a GPU the first batch of each new set of shapes (and of the modules' train/eval modes) is run eagerly ``warmup``
    times (on a side stream, as CUDA graphs ask: kernels compile and tune, the optimizer state and the allocator
    settle), then captured; the trained parameters and the optimizer state are then put back as they were before the
    warmup, and the graph replays that batch: it trains once, as any other. A capture that fails undoes the warmup too.
    Every later batch of those shapes is copied into the graph's inputs and replayed. The optimizer must be Adam or
    AdamW (the state a warmup creates is reset to theirs, zeros) made with ``capturable=True`` (a TaskBank's: its own,
    see below); the model must not sync the host inside its step (nor recompute under ``torch.utils.checkpoint``, which
    reads the RNG state on the host: gradient checkpointing, ``memory="minimal"``), and nothing may keep an autograd
    graph of the parameters alive from before (a loss kept with its graph), on which a capture fails. A graph keeps the
    hyperparameters it was captured with (``max_grad_norm``, ``autocast``, each param group's floats): a learning-rate
    schedule needs the lr as a tensor (``lr=torch.tensor(1e-3, device="cuda")``), which the step reads from memory; any
    other change raises, as does a replay once the parameters or the optimizer state live elsewhere (the graph writes
    where they were). Elsewhere (CPU) every step runs eagerly. ``autocast``: the dtype of ``torch.autocast``, or None.

    A :class:`~bitfit_fast.TaskBank` trains in mixed batches the same way: ``GraphedStep(bank, bank.optimizer(...))``
    and ``step(batch, tasks)`` with the examples' tasks (names or indices, checked on the host) and the batch's
    ``labels``; the step takes ``bank.loss``, clips each task on its own (``bank.clip_grad_norm_``) and steps the
    batch's tasks, all decided on the device, so that one graph serves every mix of tasks (the batch key ``tasks``
    is the step's own). Its heads must be linear layers with a bias (a BERT classifier): other heads run a
    sub-batch per task, which a graph cannot.

    ``drop_full_masks``: a batch whose ``attention_mask`` is all ones (one host sync a step asks) or that has none
    replays the graph of the batch without one, captured as unpadded (``batch_without_padding``); a graph captured
    with a mask attends under it, padding or not (on an H200 that cost a BERT-base step 8.6 of 38.6 ms of GPU
    work). For models that read the mask only as padding (the fused families' encoders and classification heads);
    a custom ``loss(model, batch)`` then gets the batch without it. False keeps every mask.

        step = GraphedStep(model, optimizer, max_grad_norm=1.0, autocast=torch.bfloat16)
        for batch in batches:  # dicts of tensors, already on the model's device
            loss = step(batch)
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = 1.0,
                 autocast: torch.dtype | None = None, warmup: int = 2,
                 loss: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None, drop_full_masks: bool = True):
        from .task_bank import TaskAdamW, TaskBank  # here: the task bank runs the fused path, which imports this

        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup is a number of steps, at least 1 (kernels compile and tune in the first), got "
                             f"{warmup!r}")
        check_max_norm("max_grad_norm", max_grad_norm, none_means="no clipping")
        if autocast is not None and not (isinstance(autocast, torch.dtype) and autocast.is_floating_point):
            raise ValueError(f"autocast is the dtype of torch.autocast (torch.bfloat16 or torch.float16), or None for "
                             f"fp32; got {autocast!r}")
        self.bank = model if isinstance(model, TaskBank) else None
        if self.bank is not None:
            if not isinstance(optimizer, TaskAdamW) or optimizer.bank is not model:
                raise ValueError("a TaskBank's GraphedStep takes the bank's own optimizer, bank.optimizer(...), which "
                                 f"steps only the tasks of each batch; got {type(optimizer).__name__}")
            if loss is not None:
                raise ValueError("a TaskBank's GraphedStep takes the bank's loss (bank.loss), not loss=")
        elif not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            raise ValueError(f"GraphedStep takes torch.optim.Adam or AdamW, got {type(optimizer).__name__}: the "
                             "state its warmup creates is reset to Adam's initial state, zeros")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.autocast = autocast
        self.warmup = warmup
        self.loss = _bank_loss if self.bank is not None else loss or _model_loss
        self.drop_full_masks = drop_full_masks
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._modules = list(model.modules())
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
            if self.bank is not None:
                self.bank.clip_grad_norm_(self.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.bank is not None:
            self.optimizer.step(batch[TASKS])
        else:
            self.optimizer.step()
        return loss.detach()

    def _check_capturable(self) -> None:
        """Refuse, before any warmup step, what a capture cannot take."""
        from .task_bank import TaskHeads

        if self.bank is not None:  # its optimizer decides on the device
            general = [name for name, module in self.bank.named_modules()
                       if isinstance(module, TaskHeads) and module.widths is None]
            if general:
                raise ValueError(f"the bank's heads {general} are not linear layers with a bias: they run a sub-batch "
                                 "per task, which asks the host which tasks a batch holds, and a CUDA graph cannot "
                                 "capture it")
        elif not all(group.get("capturable") for group in self.optimizer.param_groups):
            raise ValueError(f"{type(self.optimizer).__name__} is not capturable: a CUDA graph replays its step only "
                             "with capturable=True (e.g. torch.optim.AdamW(params, capturable=True); fused=True "
                             "alone is not enough)")
        # DDP keeps them alive by design; built on a side stream, as PyTorch's recipe for CUDA graphs says, it captures.
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        kept = [] if ddp else _kept_accumulators(self.params)
        if kept:
            names = {id(p): name for name, p in self.model.named_parameters()}
            raise ValueError(f"something keeps an autograd graph of the parameters alive ({names.get(id(kept[0]))!r} "
                             "among them): a loss or an output of an earlier step that still holds its graph, or a "
                             "view of a parameter made with gradients. A CUDA graph's capture fails on it ('operation "
                             "would make the legacy stream depend on a capturing blocking stream'): delete it, or "
                             "keep loss.detach() or loss.item() instead")
        for name, module in self.model.named_modules():
            if getattr(module, "bitfit_memory", None) == "minimal" or getattr(module, "gradient_checkpointing", False):
                raise ValueError(f"{name or 'the model'} recomputes under torch.utils.checkpoint (memory='minimal' "
                                 "or gradient checkpointing), which reads the RNG state on the host: a CUDA graph "
                                 "cannot capture it. Use memory='default' or 'lean' with GraphedStep")

    def _modes(self) -> tuple[bool, ...]:
        """Every module's train/eval mode: each dropout drops by its own (eval mode, Monte Carlo dropout), and a
        graph replays the masks of the modes it was captured in."""
        return tuple(module.training for module in self._modules)

    def _settings(self) -> tuple:
        """What a graph replays as it was at its capture: the clipping, the autocast dtype and each param group's
        hyperparameters but tensors (a tensor lr is read from memory at every replay)."""
        groups = tuple(tuple((k, v) for k, v in sorted(group.items())
                             if k != "params" and not isinstance(v, torch.Tensor))
                       for group in self.optimizer.param_groups)
        return self.max_grad_norm, self.autocast, groups

    def _addresses(self) -> tuple:
        """Where the parameters and the optimizer's state tensors live: a graph writes there at every replay."""
        return tuple(p.data_ptr() for p in self.params) + tuple(
            value.data_ptr() for p in self.params for value in self.optimizer.state.get(p, {}).values()
            if isinstance(value, torch.Tensor))

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
        self._check_capturable()
        snapshot = self._snapshot()
        inputs = {key: value.clone() for key, value in batch.items()}
        stream = torch.cuda.current_stream()
        body_errors = []

        def body():
            try:
                return self._eager(inputs)
            except BaseException as error:
                body_errors.append(error)
                raise

        try:
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            try:
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self._eager(inputs)
            finally:
                stream.wait_stream(side)  # also after a failed step: the restore below must come after its kernels
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph, and stay there
            with torch.cuda.graph(graph, pool=self._pool):
                loss = body()
        except BaseException as error:
            # A model that cannot be captured keeps what it had trained: the warmup steps are undone. A capture that
            # an illegal operation invalidated leaves its own stream current: the step's comes back. The error to
            # see is the step's own, not the capture's end failing after it. (After a sticky CUDA error the restore
            # fails too, and torch's RNG may refuse eager draws.)
            torch.cuda.set_stream(stream)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                self._restore(snapshot)
            if body_errors and body_errors[0] is not error:
                raise body_errors[0] from error
            raise
        self._pool = graph.pool()
        self._restore(snapshot)
        return _Capture(graph, inputs, loss, self._settings(), [p.grad for p in self.params], self._addresses())

    def __call__(self, batch: dict, tasks=None) -> torch.Tensor:
        """One step on ``batch``; ``tasks``: a TaskBank's examples' tasks (names or indices), else None."""
        if not batch or not all(isinstance(value, torch.Tensor) for value in batch.values()):
            raise TypeError("a batch is a non-empty dict of tensors")
        if self.bank is not None:
            if tasks is None or "labels" not in batch or TASKS in batch:
                raise TypeError(f"a TaskBank's step takes a batch with its labels (and no key {TASKS!r}, the step's "
                                "own) and each example's task: step(batch, tasks)")
            # Checked here, on the host where names or a CPU tensor are given: the graph reads them unchecked.
            batch = {**batch, TASKS: self.bank.task_index(tasks, next(iter(batch.values())).device)}
        elif tasks is not None:
            raise TypeError("tasks= is a TaskBank's: this model takes a batch alone")
        if not next(iter(batch.values())).is_cuda:
            return self._eager(batch)
        mask = batch.get("attention_mask")
        unpadded = self.drop_full_masks and (mask is None or bool(mask.all()))
        if unpadded:
            # No padding: the graph of the batch without its mask (the same computation), whose attention needs no
            # mask and whose last layer may run the first tokens only. A captured mask would stay a mask: the
            # layout cannot ask the GPU during a capture. The question is one sync a step, before the replay.
            batch = {key: value for key, value in batch.items() if key != "attention_mask"}
        key = (_signature(batch), self._modes())
        capture = self._captures.get(key)
        if capture is None:
            with batch_without_padding() if unpadded else contextlib.nullcontext():
                capture = self._captures[key] = self._capture(batch)
        else:
            if self._settings() != capture.settings:
                raise ValueError("a hyperparameter changed since the step was captured (max_grad_norm, autocast or "
                                 "an optimizer setting), and the graph replays what it saw: give the optimizer "
                                 "lr=torch.tensor(...) to schedule the learning rate; for another change, make a "
                                 "new GraphedStep")
            if self._addresses() != capture.addresses:
                raise ValueError("the parameters or the optimizer's state live elsewhere since the step was captured "
                                 "(load_state_dict, param.data = ..., .to()), and the graph writes where they were: "
                                 "make a new GraphedStep")
            for name, value in batch.items():
                capture.inputs[name].copy_(value)
        capture.graph.replay()
        for param, grad in zip(self.params, capture.grads, strict=True):
            param.grad = grad  # this graph's gradients (another graph's capture left its own there)
        return capture.loss.clone()
