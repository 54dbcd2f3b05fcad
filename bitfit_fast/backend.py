"""Which implementation runs a frozen linear / LayerNorm: the Triton kernels or plain torch ops."""

import importlib
import os

import torch

from .errors import UserError

BACKENDS = ("auto", "torch", "triton")


def triton_kernels():
    """The Triton kernel package, or None where Triton cannot be imported (e.g. no wheel for this platform)."""
    try:
        return importlib.import_module("bitfit_fast_kernels")
    except ImportError:
        return None


def check_backend(backend: str) -> None:
    """Fail at apply() time, not at the first forward, when the asked backend cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "triton":
        return
    kernels = triton_kernels()
    if kernels is None:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton); or use backend='torch'")
    if not torch.cuda.is_available() and not kernels.INTERPRETER:
        hint = (
            " TRITON_INTERPRET=1 is set now but was not when bitfit_fast_kernels was imported; set it before."
            if os.environ.get("TRITON_INTERPRET") == "1"
            else ""
        )
        raise RuntimeError(
            "backend='triton' needs a CUDA GPU, or TRITON_INTERPRET=1 set before importing bitfit_fast to run "
            f"the kernels on CPU (slow: for tests). Use backend='torch' or 'auto' otherwise.{hint}"
        )


def uses_triton(backend: str, x: torch.Tensor) -> bool:
    """'auto' takes the kernels for CUDA tensors only; 'triton' always (the kernels raise a clear error)."""
    if backend == "triton":
        return True
    return backend == "auto" and x.is_cuda and triton_kernels() is not None


def check_backend_option(backend: str, precision: str | None = None) -> None:
    """A command's --backend usable here, with ``precision`` (a run's: fp32, bf16, fp16) on this machine, or one
    line saying why not (before any model loads)."""
    try:
        check_backend(backend)
    except RuntimeError as error:
        raise UserError(f"--backend {backend}: {error}") from error
    if backend == "triton" and precision == "bf16" and not torch.cuda.is_available():
        raise UserError("--backend triton --bf16: the Triton CPU interpreter cannot multiply bf16 (triton#11584); "
                        "use --fp16 or --fp32 with it, or --backend torch")
