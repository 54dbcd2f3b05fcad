"""What a benchmark compares: each provider is a model with its optimizer and training step.

Every provider trains the same randomly initialised model on the same batches with the paper's optimizer
(AdamW, clipping 1.0), in bf16 autocast on a GPU. There the bitfit_fast providers hold their frozen weights in bf16
(``apply(dtype=torch.bfloat16)``: frozen weights need no fp32 master, and autocast then casts none of them each step)
where the reference and full fine-tuning keep the fp32 weights they load, as stock PyTorch training does.
"""

import copy
import dataclasses
from collections.abc import Callable

import torch

from .reference import freeze_for_bitfit

PROVIDERS = {
    "reference": "PyTorch BitFit, eager (non-bias weights requires_grad=False), batches padded to their longest",
    "reference-compiled": "the same under torch.compile",
    "full": "full fine-tuning, eager",
    "fast": "bitfit_fast, fused layers (memory=default)",
    "fast-lean": "bitfit_fast, fused layers (memory=lean)",
    "fast-minimal": "bitfit_fast, fused layers (memory=minimal)",
    "fast-modules": "bitfit_fast, module-level path only (fuse_layers=False)",
    "fast-torch": "bitfit_fast, fused layers on the torch backend (no Triton)",
    "fast-graphed": "bitfit_fast, fused layers, the whole step replayed as a CUDA graph (GPU, fixed shapes)",
    "reference-graphed": "PyTorch BitFit eager, the whole step replayed as a CUDA graph (GPU, fixed shapes)",
}
# Providers whose step is a CUDA graph (bitfit_fast.GraphedStep): one capture per batch shape, so they run on
# fixed-length workloads only; their peak memory is not measured (the graph's pool holds the step's memory for good,
# which the allocator's peak above the resident state does not see).
GRAPHED = {"fast-graphed", "reference-graphed"}

# bitfit_fast.apply() options of the fast providers.
FAST_OPTIONS = {"fast": {}, "fast-lean": dict(memory="lean"), "fast-minimal": dict(memory="minimal"),
                "fast-modules": dict(fuse_layers=False), "fast-torch": dict(backend="torch"), "fast-graphed": {}}


@dataclasses.dataclass
class Trainer:
    """One provider's model, optimizer and training step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[dict], torch.Tensor]
    method: str  # "bitfit" or "full": which FLOPs count as the model's


def build_provider(name: str, base: torch.nn.Module, device: str, copy_base: bool = True,
                   fused_optimizer: bool = False) -> Trainer:
    """The provider's trainer on a copy of ``base`` (or on ``base`` itself with ``copy_base=False``);
    ``fused_optimizer``: AdamW's single-kernel implementation (``fused=True``, GPU) instead of torch's default."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; known: {sorted(PROVIDERS)}")
    model = copy.deepcopy(base) if copy_base else base
    method = "full" if name == "full" else "bitfit"
    if name in FAST_OPTIONS:
        import bitfit_fast

        bitfit_fast.apply(model, dtype=torch.bfloat16 if device == "cuda" else None, **FAST_OPTIONS[name])
    elif name != "full":
        freeze_for_bitfit(model)
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = name in GRAPHED
    if graphed and device != "cuda":
        raise ValueError(f"{name} replays a CUDA graph: it needs a GPU")
    optimizer = torch.optim.AdamW(params, lr=1e-3 if method == "bitfit" else 1e-5, fused=fused_optimizer or None,
                                  capturable=graphed)
    forward = torch.compile(model) if name == "reference-compiled" else model
    autocast = torch.bfloat16 if device == "cuda" else None
    if graphed:
        import bitfit_fast

        # The reference keeps its masks: dropped, transformers 5.17 built one of its own during the capture, under
        # which the H200 ran its step at 92.4 ms against 52.8 with the batch's (benches/results/gpu/README.md).
        step = bitfit_fast.GraphedStep(model, optimizer, 1.0, autocast, drop_full_masks=name == "fast-graphed")
        return Trainer(model, optimizer, step, method)

    def step(batch: dict) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.detach()

    return Trainer(model, optimizer, step, method)
