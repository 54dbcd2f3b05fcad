import os

import pytest
import torch

# Without a GPU the Triton kernels run under the CPU interpreter; it must be on before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def gemm_dtypes(monkeypatch):
    """The operand dtypes of every frozen-weight GEMM bitfit_fast's ops run (forward and backward, either backend),
    as (input or output gradient, weight) pairs: a half-precision test that asserts them fails where a path would
    compute in fp32, which its error bound alone lets pass."""
    import bitfit_fast_kernels
    from bitfit_fast import torch_ops

    seen = []

    def recording(gemm):
        def recorded(a, weight, *args, **kwargs):
            seen.append((a.dtype, weight.dtype))
            return gemm(a, weight, *args, **kwargs)
        return recorded

    for impl in (torch_ops, bitfit_fast_kernels):
        for name in ("linear_forward", "linear_backward"):
            monkeypatch.setattr(impl, name, recording(getattr(impl, name)))
    return seen


@pytest.fixture
def bucketed_rows(monkeypatch):
    """Row bucketing (bitfit_fast.unpadding.bucketed: zero rows after the real tokens), which runs on GPUs only,
    on every device, so that the CPU tests run that path too."""
    from bitfit_fast import unpadding

    monkeypatch.setattr(unpadding, "BUCKETED_DEVICES", {"cuda", "cpu"})


@pytest.fixture
def grouped_attention(monkeypatch):
    """Attention by length groups (bitfit_fast.unpadding.length_groups), which runs on CPU only and on larger batches,
    on the tests' small ones on every device: every drop of a sequence's length to 0.8 of its group's longest starts
    a group."""
    from bitfit_fast import unpadding

    monkeypatch.setattr(unpadding, "MIN_GROUP_SAVING", 0)
    monkeypatch.setattr(unpadding, "GROUPED_DEVICES", {"cuda", "cpu"})
    # Each grouped attention's groups, for the test to read; a test that never attended by groups fails here.
    grouped, assemble = [], unpadding._GroupsToLayout.apply

    def recorded(groups, *args):
        grouped.append(groups)
        return assemble(groups, *args)

    monkeypatch.setattr(unpadding._GroupsToLayout, "apply", recorded)
    yield grouped
    assert grouped, "no attention ran by length groups: the test's batches must have uneven lengths"
