"""Tolerance rule of flash-attention's tests: ours may be at most twice as far from the float64 truth as torch
at the same precision, plus a small slack per dtype.

The slack is relative to the largest value of the tensor compared, never a flat one: a flat slack larger than a
small gradient lets any error of it pass. It is ~16 units in the last place for fp32 (the worst excess over twice
torch's error seen in the kernel tests is 0.8 of one: sums in another order) and ~2 for fp16 and bf16 (none seen).
"""

import torch

ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_as_accurate_as_torch(ours: torch.Tensor, torch_same_precision: torch.Tensor, truth: torch.Tensor,
                                what: str = "") -> None:
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert ours.dtype == torch_same_precision.dtype, f"{what}: dtype {ours.dtype} != {torch_same_precision.dtype}"
    err_ours = (ours.double() - truth).abs().max().item()
    err_torch = (torch_same_precision.double() - truth).abs().max().item()
    bound = 2 * err_torch + ATOL[ours.dtype] * truth.abs().max().item()
    assert err_ours <= bound, f"{what}: max error {err_ours:.3e} > {bound:.3e} (torch's: {err_torch:.3e})"


def torch_grads(fn, x: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor, precision: torch.dtype):
    """Gradients of fn(x, bias, precision) for x and the bias, by torch autograd in ``precision``."""
    xp = x.to(precision).requires_grad_()
    bp = bias.to(precision).requires_grad_()
    return torch.autograd.grad(fn(xp, bp, precision), (xp, bp), dy.to(precision))


def assert_autocast_as_accurate_as_torch(ours: dict, torch_same_precision: dict, truth: dict, precision: torch.dtype,
                                         what: str = "") -> None:
    """The rule above on the outputs of a whole model run under autocast in ``precision`` (its logits, each trainable
    gradient: fp32 tensors by name), each against the fp32 ``truth``: err(ours) <= 2 err(torch under the same
    autocast) + 2 ATOL[precision] * max|truth| (about 4 units in the last place of the format at the tensor's largest
    value: a model compounds the roundings of many layers). The slack is relative to each tensor's own largest value,
    never a flat one: gradients span orders of magnitude (real MiniLM's query-bias gradients are 3e-4, its
    classifier's 2e-1), and a flat slack larger than a whole gradient lets any error of it pass."""
    assert ours.keys() == torch_same_precision.keys() == truth.keys(), what
    failures = []
    for name, exact in truth.items():
        exact = exact.double()
        largest = exact.abs().max().item()
        err_ours = (ours[name].double() - exact).abs().max().item()
        err_torch = (torch_same_precision[name].double() - exact).abs().max().item()
        bound = 2 * err_torch + 2 * ATOL[precision] * largest
        if not err_ours <= bound:
            failures.append(f"{name}: max error {err_ours:.3e} > {bound:.3e} (torch's: {err_torch:.3e}, largest "
                            f"value: {largest:.3e})")
    assert not failures, f"{what} under {precision} autocast, less accurate than torch's:\n" + "\n".join(failures)


def assert_gemms_ran_in(precision: torch.dtype, gemm_dtypes: list) -> None:
    """Every GEMM recorded by the ``gemm_dtypes`` fixture (conftest) had both operands in ``precision``: the rules
    above bound an error from above, and a path computing in fp32 would pass them."""
    assert gemm_dtypes and {dtype for pair in gemm_dtypes for dtype in pair} == {precision}, set(gemm_dtypes)


class TorchWithNanEmpty:
    """torch, but ``empty`` floating-point tensors hold NaN (patch a kernel module's ``torch`` with it): a partial
    sum read but never written shows."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        tensor = torch.empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor


class TorchWithGuardRows:
    """torch, but ``empty`` and ``empty_like`` tensors are the first rows of a NaN buffer ``rows`` rows longer
    (patch a kernel module's ``torch`` with it): a kernel that writes past the end of its output leaves a guard row
    that is not NaN (``guards_intact``). On a GPU such a write can go unnoticed; on CPU it may only crash later."""

    def __init__(self, rows: int):
        self.rows = rows
        self.buffers = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def _guarded(self, shape, dtype, device) -> torch.Tensor:
        shape = tuple(shape)
        buffer = torch.full((shape[0] + self.rows, *shape[1:]), float("nan"), dtype=dtype, device=device)
        self.buffers.append((buffer, shape[0]))
        return buffer[:shape[0]]

    def empty(self, *size, dtype=None, device=None):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return self._guarded(shape, dtype or torch.get_default_dtype(), device)

    def empty_like(self, tensor, dtype=None):
        return self._guarded(tensor.shape, dtype or tensor.dtype, tensor.device)

    def guards_intact(self) -> bool:
        return bool(self.buffers) and all(buffer[used:].isnan().all() for buffer, used in self.buffers)
