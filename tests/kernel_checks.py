"""Tolerance rule of flash-attention's tests: ours may be at most twice as far from the float64 truth as torch
at the same precision, plus a small absolute slack per dtype."""

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_as_accurate_as_torch(ours: torch.Tensor, torch_same_precision: torch.Tensor, truth: torch.Tensor,
                                what: str = "") -> None:
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert ours.dtype == torch_same_precision.dtype, f"{what}: dtype {ours.dtype} != {torch_same_precision.dtype}"
    err_ours = (ours.double() - truth).abs().max().item()
    err_torch = (torch_same_precision.double() - truth).abs().max().item()
    bound = 2 * err_torch + ATOL[ours.dtype] * max(1.0, truth.abs().max().item())
    assert err_ours <= bound, f"{what}: max error {err_ours:.3e} > {bound:.3e} (torch's: {err_torch:.3e})"


def torch_grads(fn, x: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor, precision: torch.dtype):
    """Gradients of fn(x, bias, precision) for x and the bias, by torch autograd in ``precision``."""
    xp = x.to(precision).requires_grad_()
    bp = bias.to(precision).requires_grad_()
    return torch.autograd.grad(fn(xp, bp, precision), (xp, bp), dy.to(precision))
